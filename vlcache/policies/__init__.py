"""Compression policies: one small dataclass per method, all on one base (`base.Policy`)."""

import ast
from dataclasses import MISSING, fields

from .base import BUDGET_FIELDS as BUDGET_FIELDS  # public: the apps list every policy's budgets
from .base import DecodeEvicting, Policy
from .cake import CAKE
from .compose import Composed
from .elastic import ElasticCache
from .full import Full
from .h2o import H2O
from .lookm import LOOKM
from .parts import (
    Allocator,
    Merger,
    Schedule,
    register_allocator,
    register_merger,
    register_schedule,
    register_scorer,
)
from .presets import PRESETS, preset
from .pyramidkv import PyramidKV
from .random import Random
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .view import Eviction, EvictionState, LayerStatistics, LayerView, LookaheadState, Plan, Request, Selection
from .vl_cache import VLCache

POLICIES: dict[str, type[Policy]] = {
    "full": Full,
    "random": Random,
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "vlcache": VLCache,
    "lookm": LOOKM,
    "elastic": ElasticCache,
    "cake": CAKE,
    "compose": Composed,
}


def make_policy(name: str, **settings) -> Policy:
    """A policy by name (as the CLI and demo spell it), e.g. make_policy("snapkv", budget=0.1)."""
    key = name.lower().replace("-", "").replace("_", "").replace("elasticcache", "elastic")
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    cls = POLICIES[key]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(
            f"{key} has no setting {', '.join(map(repr, unknown))}; its settings: {', '.join(sorted(known))}"
        )
    wrong = setting_type_error(cls, settings)
    if wrong:
        raise ValueError(f"{key}: {wrong}")
    return cls(**settings)


def setting_type_error(cls, settings: dict) -> str | None:
    """The first setting whose value is not of the kind its default is (a number for a number, True/False for a
    flag, a word for a word), said in one line, or None: `window="x"` reached `window < 1` as a TypeError."""
    defaults = {f.name: f.default for f in fields(cls) if f.default is not MISSING}
    for key, value in settings.items():
        default = defaults.get(key)
        if default is None:
            continue  # no default, or None (an amount, checked by the policy itself)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, bool):
            ok, wanted = isinstance(value, bool), "True or False"
        elif isinstance(default, int):
            ok, wanted = number and isinstance(value, int), "a whole number"
        elif isinstance(default, float):
            ok, wanted = number, "a number"
        elif isinstance(default, str):
            ok, wanted = isinstance(value, str), "a word"
        elif isinstance(default, tuple):
            ok, wanted = isinstance(value, (tuple, list)), "a tuple such as ('markers',)"
        else:
            continue
        if not ok:
            return f"{key}={value!r}: {key} takes {wanted} (default {default!r})"
    return None


def parse_settings(items: list[str]) -> dict:
    """Policy settings from "name=value" strings (the command line's --set, the speed benchmark's "h2o:k=v"): the
    value as a Python literal ("16", "0.5", "('markers',)", "True"), else as a plain string ("pivot")."""
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"not a setting: {item!r} (write name=value, e.g. evict_every=16)")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        out[key.strip()] = value
    return out


__all__ = [
    "Allocator",
    "CAKE",
    "Composed",
    "DecodeEvicting",
    "LOOKM",
    "POLICIES",
    "PRESETS",
    "ElasticCache",
    "Eviction",
    "EvictionState",
    "Full",
    "H2O",
    "LayerStatistics",
    "LayerView",
    "Merger",
    "LookaheadState",
    "Plan",
    "Policy",
    "PyramidKV",
    "Random",
    "Request",
    "Schedule",
    "Selection",
    "SnapKV",
    "StreamingLLM",
    "VLCache",
    "make_policy",
    "parse_settings",
    "preset",
    "register_allocator",
    "register_merger",
    "register_schedule",
    "register_scorer",
]
