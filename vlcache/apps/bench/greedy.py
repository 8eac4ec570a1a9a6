"""The timed greedy loop both sides of the peer benchmark run, so that vlcache and kvpress are measured alike.

Depends on torch only, so the kvpress worker, which runs in another virtualenv, can load this file by path.
"""

import time
from contextlib import nullcontext

import torch


def greedy(
    model, ids, cache, new_tokens: int, prefill_context=None, cache_kwarg: str = "past_key_values", on_prefill=None
) -> dict:
    """Prefill `ids` into `cache` (inside `prefill_context`, e.g. a kvpress press), then greedy steps with explicit
    positions. `cache_kwarg`: what the installed transformers calls the cache argument (kvpress's pinned 5.2 says
    `past_key_values`; vlcache passes its compat name). `on_prefill(cache)`, if given, looks at the cache between
    prefill and decoding (untimed); its result comes back as `at_prefill`. Returns prefill seconds, decode ms per
    token, KV bytes held at the end and the generated tokens."""
    n = ids.shape[1]
    at_prefill = None
    with torch.inference_mode():
        t0 = time.perf_counter()
        with prefill_context if prefill_context is not None else nullcontext():
            out = model(input_ids=ids, use_cache=True, **{cache_kwarg: cache})
        t1 = time.perf_counter()
        if on_prefill is not None:
            at_prefill = on_prefill(cache)
            t1, prefill_s = time.perf_counter(), t1 - t0
        else:
            prefill_s = t1 - t0
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [int(tok)]
        for s in range(new_tokens - 1):
            out = model(input_ids=tok, position_ids=torch.tensor([[n + s]]), use_cache=True, **{cache_kwarg: cache})
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(tok))
        t2 = time.perf_counter()
    kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return dict(
        prefill_s=prefill_s,
        decode_ms=1000 * (t2 - t1) / max(1, new_tokens - 1),
        kv_bytes=kv,
        tokens=tokens,
        at_prefill=at_prefill,
    )
