"""Helpers for tests: policy views from plain tensors, prompts per family."""

import torch

from vlcache import testing
from vlcache.modality import build_layout
from vlcache.policies.view import LayerView

IMG_ID, MARK_ID = 9, 8

FAMILIES = list(testing.BUILDERS)
VIDEO_FAMILIES = ["llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def prompt_for(family: str, question: str = "what is it?") -> list:
    """A prompt with text, images (several where the family takes images) and a video where it takes one."""
    if family == "llava_next_video":
        return ["ab", testing.Video(4), question]
    if family in VIDEO_FAMILIES:
        return ["ab", testing.IMAGE, "cd", testing.Video(4), question]
    return ["ab", testing.IMAGE, "cd", testing.IMAGE, question]


def layout_from_ids(ids, mask=None):
    """Layout of hand-written ids: IMG_ID is an image token, MARK_ID a marker."""
    ids = torch.as_tensor(ids)
    ids = ids[None] if ids.ndim == 1 else ids
    return build_layout(
        ids, family="test", image_token=IMG_ID, video_token=None, markers=frozenset({MARK_ID}), attention_mask=mask
    )


def view_for(
    layout, q=None, k=None, v=None, *, heads=4, kv_heads=2, d=8, layer=0, depth=None, num_layers=1, seed=0, request=None
):
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
        request=request,
    )


def kept_indices(policy, view):
    sel = policy.on_prefill(view)
    if sel is None:
        return None
    return sel[view.layer].indices


def run_policy(
    policy,
    layout,
    *,
    layers=2,
    heads=4,
    kv_heads=2,
    d=8,
    seed=0,
    qkv=None,
    decode=0,
    decode_qkv=None,
    on_layer=None,
    on_prefill=None,
    on_step=None,
):
    """Drive `policy` through a real CompressedCache over hand-made tensors, as generate would: every layer's
    prefill, the whole-model step, then `decode` single-token steps. `qkv[l]` gives (q, k, v) of layer l;
    `decode_qkv(step, l)` those of a decode step (default: random); `on_layer(cache, l)` runs after each prefill
    layer, `on_prefill(cache)` after the whole-model step, `on_step(cache, step)` after each decode step.
    Returns the cache."""
    import transformers as T

    from vlcache.hf.cache import CompressedCache
    from vlcache.hf.policy_runner import PolicyRunner

    cfg = T.LlamaConfig(
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_size=heads * d,
        vocab_size=16,
    )
    cache = CompressedCache(cfg)
    B, n = layout.modality.shape
    cache.begin(layout, layout.valid)
    runner = PolicyRunner(policy, heads)
    g = torch.Generator().manual_seed(seed)
    for li in range(layers):
        if qkv is not None:
            q, k, v = qkv[li]
        else:
            q, k, v = (
                torch.randn(B, heads, n, d, generator=g),
                torch.randn(B, kv_heads, n, d, generator=g),
                torch.randn(B, kv_heads, n, d, generator=g),
            )
        cache.update(k, v, li)
        runner.layer_forward(cache, li, q, d**-0.5)
        if on_layer is not None:
            on_layer(cache, li)
    runner.finish_prefill(cache)
    if on_prefill is not None:
        on_prefill(cache)
    for step in range(decode):
        cache.extend(torch.ones(B, 1, dtype=torch.bool))
        for li in range(layers):
            if decode_qkv is not None:
                q, k, v = decode_qkv(step, li)
            else:
                q, k, v = (
                    torch.randn(B, heads, 1, d, generator=g),
                    torch.randn(B, kv_heads, 1, d, generator=g),
                    torch.randn(B, kv_heads, 1, d, generator=g),
                )
            cache.update(k, v, li)
            if runner.looking(cache, li):  # as the session's attention does, before attending
                runner.before_attention(cache, li, q, d**-0.5)
            runner.layer_forward(cache, li, q, d**-0.5)
        if on_step is not None:
            on_step(cache, step)
    return cache


def real_positions(cache, li):
    """Per row and KV head, the sorted positions of the real tokens layer `li` holds (filler and padding left out):
    what two caches must agree on when their slot order or filler may differ."""
    layer = cache.layers[li]
    pos, valid = layer.slot_positions(), cache.slot_valid(layer)
    return [[sorted(pos[b, h][valid[b, h]].tolist()) for h in range(pos.shape[1])] for b in range(pos.shape[0])]


def kept_positions(cache, layer=0):
    """[B, Hk, K] original positions held by a layer."""
    return cache.layers[layer].slot_positions()


def rows_alone_and_batched(policy_factory, rows, *, layers=2, heads=4, kv_heads=2, d=8, decode=5, seed=0):
    """Run each prompt of `rows` (lists of token ids, see `layout_from_ids`) alone and all of them as one left-padded
    batch, every row seeing the same q/k/v in both (drawn per row, the batch's padding zeros), through the prefill
    and `decode` steps. Returns (alone, batched): per row, per layer, per KV head the sorted positions held, counted
    from the row's first real token (generated tokens follow its prompt)."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        return (
            torch.randn(1, heads, n, d, generator=g),
            torch.randn(1, kv_heads, n, d, generator=g),
            torch.randn(1, kv_heads, n, d, generator=g),
        )

    prompt = [[draw(len(r)) for _ in range(layers)] for r in rows]
    steps = [[[draw(1) for _ in range(layers)] for _ in range(decode)] for _ in rows]

    def run(which):
        n = max(len(rows[i]) for i in which)
        ids = torch.tensor([[0] * (n - len(rows[i])) + list(rows[i]) for i in which])
        mask = torch.tensor([[0] * (n - len(rows[i])) + [1] * len(rows[i]) for i in which])

        def pad(t):
            return torch.cat([t.new_zeros(*t.shape[:2], n - t.shape[2], t.shape[3]), t], 2)

        qkv = [tuple(torch.cat([pad(prompt[i][li][j]) for i in which]) for j in range(3)) for li in range(layers)]

        def step(s, li):
            return tuple(torch.cat([steps[i][s][li][j] for i in which]) for j in range(3))

        cache = run_policy(
            policy_factory(), layout_from_ids(ids, mask), layers=layers, heads=heads, kv_heads=kv_heads, d=d,
            qkv=qkv, decode=decode, decode_qkv=step,
        )  # fmt: skip
        out = []
        for b, i in enumerate(which):
            off = n - len(rows[i])
            out.append([[[p - off for p in h] for h in real_positions(cache, li)[b]] for li in range(layers)])
        return out

    return [run([i])[0] for i in range(len(rows))], run(list(range(len(rows))))
