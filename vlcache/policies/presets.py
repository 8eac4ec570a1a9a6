"""Every published method written as its four parts (policies/parts/): `preset("cake", budget=0.1)` is a
`Composed` that keeps what `CAKE(budget=0.1)` keeps, after the prefill and at every decode step
(tests/test_golden.py replays every recorded case of every method through its preset)."""

from __future__ import annotations

from dataclasses import fields

from .compose import Composed

PRESETS: dict[str, dict] = {
    "snapkv": {"scorer": "snapkv"},
    "pyramidkv": {"scorer": "snapkv", "allocator": "pyramid"},
    "vlcache": {"scorer": "vlcache", "allocator": "density"},
    "lookm": {"scorer": "lookm", "merger": "lookm"},
    "h2o": {"scorer": "h2o", "schedule": "h2o"},
    "streamingllm": {"scorer": "streamingllm", "schedule": "streamingllm"},
    "cake": {"scorer": "cake", "allocator": "preference", "cascading": True, "schedule": "cake"},
    "elastic": {"scorer": "elastic", "merger": "elastic", "schedule": "elastic"},
    "random": {"scorer": "random"},
}

_PARTS = {"scorer", "allocator", "merger", "schedule", "part_settings"}


def preset(name: str, **settings) -> Composed:
    """The published method `name` as a composition of its parts, with that method's settings (its budgets and
    the settings every policy takes go to the composition; `cascading` too; the rest to the parts)."""
    if name not in PRESETS:
        raise ValueError(f"no preset {name!r}; choose one of {', '.join(PRESETS)}")
    own = {f.name for f in fields(Composed)} - _PARTS
    given = {k: v for k, v in settings.items() if k in own}
    rest = {k: v for k, v in settings.items() if k not in own}
    return Composed(**{**PRESETS[name], **given}, part_settings=rest)
