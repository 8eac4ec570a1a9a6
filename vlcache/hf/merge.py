"""Temporal merging in a Hugging Face model: a forward pre-hook on the language model that drops the merged
vision tokens from its inputs (embeddings, 2-D attention mask, position ids, Qwen3-VL's DeepStack inputs) before
its first layer runs. Positions are gathered, never renumbered: every kept token keeps its original RoPE / M-RoPE
position (the temporal index included). The cache is told (`CompressedCache.merge`), so the layout, padding and
stats describe the shorter sequence while `get_seq_length()` still counts the whole prompt."""

from __future__ import annotations

import torch

from ..policies.temporal import compact, temporal_keep


def merge_inputs(cache, policy, kwargs: dict) -> dict | None:
    """The language model's keyword arguments with the merged tokens dropped, or None to leave them as they are
    (not a prompt's first forward, no vision, nothing merged)."""
    embeds = kwargs.get("inputs_embeds")
    if cache is None or cache.prefilled or cache.source_layout is not None or embeds is None:
        return None
    layout = cache.layout
    if layout is None or not layout.has_vision or embeds.shape[1] != layout.length:
        return None
    with torch.no_grad():
        keep, merged = temporal_keep(embeds, layout, float(policy.temporal_merge), policy.temporal_mode)
    valid = layout.valid.to(keep.device)
    if bool((keep == valid).all()):
        return None
    idx, holds = compact(keep, valid)
    cache.merge(idx, holds)
    out = dict(kwargs)
    out["inputs_embeds"] = merged.gather(1, idx[..., None].expand(-1, -1, merged.shape[-1]))
    mask = kwargs.get("attention_mask")
    if mask is None or (isinstance(mask, torch.Tensor) and mask.ndim == 2):
        out["attention_mask"] = holds.to(mask.dtype if mask is not None else torch.long)
    else:
        raise ValueError("temporal merging needs a 2-D attention mask (or none) on the prompt's forward")
    out["position_ids"] = _gather_positions(kwargs.get("position_ids"), idx, layout.length)
    visual = kwargs.get("visual_pos_masks")
    if visual is not None:  # Qwen3-VL's DeepStack: vision features added to the first layers' hidden states
        still = keep.to(visual.device)[visual]  # which vision tokens (in order) stay
        out["visual_pos_masks"] = visual.gather(1, idx.to(visual.device)) & holds.to(visual.device)
        deep = kwargs.get("deepstack_visual_embeds")
        if deep is not None:
            out["deepstack_visual_embeds"] = [e[still.to(e.device)] for e in deep]
    return out


def _gather_positions(position_ids, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Position ids [B, n] or [k, B, n] (M-RoPE) at the kept positions; arange when the model was given none (it
    would otherwise number the shorter sequence from 0)."""
    B = idx.shape[0]
    if position_ids is None:
        return torch.arange(n, device=idx.device).expand(B, n).gather(1, idx)
    pos = position_ids.to(idx.device)
    if pos.shape[-2] != B:  # one row of positions for the whole batch
        pos = pos.expand(*pos.shape[:-2], B, n)
    index = idx.expand(*pos.shape[:-2], B, idx.shape[1])
    return pos.gather(-1, index)
