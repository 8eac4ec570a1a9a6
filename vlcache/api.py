"""The public entry points: `compress` (a context manager), `attach` (explicit), `last_stats`."""

from __future__ import annotations

from contextlib import contextmanager

from .hf.session import Session
from .policies import Policy, make_policy
from .stats import CompressionStats


def attach(model, policy: Policy | str = "snapkv", *, processor=None, **settings) -> Session:
    """Attach a policy to a Hugging Face model until `session.detach()`. `policy` is a Policy or a name with its
    settings as keywords (`attach(model, "snapkv", budget=0.1)`). `processor` (optional) lets vlcache find marker
    tokens the config does not name (Idefics3's <global-img>, InternVL's <img>)."""
    if isinstance(policy, str):
        policy = make_policy(policy, **settings)
    elif settings:
        raise ValueError(f"settings {sorted(settings)} go into the policy object, not next to it")
    return Session(model, policy, processor).attach()


@contextmanager
def compress(model, policy: Policy | str = "snapkv", *, processor=None, **settings):
    """Compress the KV cache of every `model.generate(...)` (or forward given a session cache) inside the block.

    with vlcache.compress(model, SnapKV(budget=0.1)) as session:
        out = model.generate(**inputs, max_new_tokens=64)
    print(session.stats.summary())
    """
    session = attach(model, policy, processor=processor, **settings)
    try:
        yield session
    finally:
        session.detach()


def last_stats(model) -> CompressionStats | None:
    """Stats of the last generate run under vlcache on this model (tokens kept per layer/modality, KV bytes)."""
    session = getattr(model, "_vlcache_session", None)
    if session is not None and (session.stats or session.prefill_stats):
        return session.stats or session.prefill_stats
    return getattr(model, "_vlcache_stats", None)
