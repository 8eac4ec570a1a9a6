"""Compression policies: one small dataclass per method, all on one base (`base.Policy`)."""

from .base import LayerView, Plan, Policy, Selection
from .full import Full
from .h2o import H2O
from .pyramidkv import PyramidKV
from .random import Random
from .snapkv import SnapKV
from .streaming import StreamingLLM

POLICIES: dict[str, type[Policy]] = {
    "full": Full,
    "random": Random,
    "streamingllm": StreamingLLM,
    "h2o": H2O,
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
}


def make_policy(name: str, **settings) -> Policy:
    """A policy by name (as the CLI and demo spell it), e.g. make_policy("snapkv", budget=0.1)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[key](**settings)


__all__ = [
    "POLICIES",
    "Full",
    "H2O",
    "LayerView",
    "Plan",
    "Policy",
    "PyramidKV",
    "Random",
    "Selection",
    "SnapKV",
    "StreamingLLM",
    "make_policy",
]
