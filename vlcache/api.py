"""The public entry points: `compress` (a context manager), `attach` (explicit), `last_stats`."""

from __future__ import annotations

from contextlib import contextmanager

from .compression_stats import CompressionStats
from .hf.session import Session
from .policies import Policy, make_policy
from .reuse import ImageKVStore


def attach(model, policy: Policy | str = "snapkv", *, processor=None, compile: bool = False, **settings) -> Session:
    """Attach a policy to a Hugging Face model until `session.detach()`. `policy` is a Policy or a name with its
    settings as keywords (`attach(model, "snapkv", budget=0.1)`). `processor` (optional) lets vlcache find marker
    tokens the config does not name (Idefics3's <global-img>, InternVL's <img>). `compile=True` runs the decode steps
    as one torch.compile'd forward over a static-capacity cache (CUDA graphs on CUDA): see hf/compiled_decode.py."""
    if isinstance(policy, str):
        policy = make_policy(policy, **settings)
    elif settings:
        raise ValueError(f"settings {sorted(settings)} go into the policy object, not next to it")
    return Session(model, policy, processor, compile=compile).attach()


@contextmanager
def compress(model, policy: Policy | str = "snapkv", *, processor=None, compile: bool = False, **settings):
    """Compress the KV cache of every `model.generate(...)` (or forward given a session cache) inside the block.

    with vlcache.compress(model, SnapKV(budget=0.1)) as session:
        out = model.generate(**inputs, max_new_tokens=64)
    print(session.stats.summary())
    """
    session = attach(model, policy, processor=processor, compile=compile, **settings)
    try:
        yield session
    finally:
        session.detach()


@contextmanager
def reuse(model, store: ImageKVStore, *, recompute: str = "first_k", k: int = 16, ratio: float = 0.15, processor=None):
    """Reuse the KV of images seen before (EPIC) in every `model.generate(...)` inside the block:

        store = vlcache.ImageKVStore(max_bytes=2 << 30)
        with vlcache.reuse(model, store) as r:          # inside vlcache.compress(...) too, to compress as well
            out = model.generate(**inputs, max_new_tokens=64)
        print(r.last)                                   # images reused, tokens recomputed, link time

    recompute: "first_k" (the first k tokens of each reused image, k=16), "cacheblend" (tokens whose layer-1 values
    deviate most, a `ratio` of them) or "full" (everything: the exact baseline). Batch size 1.
    """
    from .hf.reuse import ImageReuse

    r = ImageReuse(model, store, recompute=recompute, k=k, ratio=ratio, processor=processor).attach()
    try:
        yield r
    finally:
        r.detach()


def last_stats(model) -> CompressionStats | None:
    """Stats of the last generate run under vlcache on this model (tokens kept per layer/modality, KV bytes)."""
    session = getattr(model, "_vlcache_session", None)
    if session is not None and (session.stats or session.prefill_stats):
        return session.stats or session.prefill_stats
    return getattr(model, "_vlcache_stats", None)
