"""Helpers for tests: policy views from plain tensors, prompts per family."""

import torch

from vlcache import tiny
from vlcache.modality import build_layout
from vlcache.policies.base import LayerView

IMG_ID, MARK_ID = 9, 8

FAMILIES = list(tiny.BUILDERS)
VIDEO_FAMILIES = ["llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def prompt_for(family: str, question: str = "what is it?") -> list:
    """A prompt with text, images (several where the family takes images) and a video where it takes one."""
    if family == "llava_next_video":
        return ["ab", tiny.Video(4), question]
    if family in VIDEO_FAMILIES:
        return ["ab", tiny.IMAGE, "cd", tiny.Video(4), question]
    return ["ab", tiny.IMAGE, "cd", tiny.IMAGE, question]


def layout_from_ids(ids, mask=None):
    """Layout of hand-written ids: IMG_ID is an image token, MARK_ID a marker."""
    ids = torch.as_tensor(ids)
    ids = ids[None] if ids.ndim == 1 else ids
    return build_layout(
        ids, family="test", image_token=IMG_ID, video_token=None, markers=frozenset({MARK_ID}), attention_mask=mask
    )


def view_for(layout, q=None, k=None, v=None, *, heads=4, kv_heads=2, d=8, layer=0, depth=None, num_layers=1, seed=0):
    """A prefill LayerView over random (or given) post-RoPE q/k/v for `layout`."""
    B, n = layout.modality.shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, n, d, generator=g) if q is None else q
    k = torch.randn(B, kv_heads, n, d, generator=g) if k is None else k
    v = torch.randn(B, kv_heads, n, d, generator=g) if v is None else v
    Hk = k.shape[1]
    return LayerView(
        layer=layer,
        depth=layer if depth is None else depth,
        num_layers=num_layers,
        query=q,
        keys=k,
        values=v,
        scale=q.shape[-1] ** -0.5,
        layout=layout,
        positions=torch.arange(n).expand(B, Hk, n),
        slot_valid=layout.valid[:, None, :].expand(B, Hk, n),
        new=n,
    )


def kept_indices(policy, view):
    sel = policy.on_prefill(view)
    if sel is None:
        return None
    return sel[view.layer].indices
