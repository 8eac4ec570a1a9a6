"""Compression policies: one small dataclass per method, all on one base (`base.Policy`)."""

from .base import DecodeEvicting, Eviction, LayerView, Plan, Policy, Request, Selection
from .cake import CAKE
from .elastic import ElasticCache
from .full import Full
from .h2o import H2O
from .lookm import LOOKM
from .pyramidkv import PyramidKV
from .random import Random
from .snapkv import SnapKV
from .streaming import StreamingLLM
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
}


def make_policy(name: str, **settings) -> Policy:
    """A policy by name (as the CLI and demo spell it), e.g. make_policy("snapkv", budget=0.1)."""
    key = name.lower().replace("-", "").replace("_", "").replace("elasticcache", "elastic")
    if key not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[key](**settings)


__all__ = [
    "CAKE",
    "DecodeEvicting",
    "LOOKM",
    "POLICIES",
    "ElasticCache",
    "Eviction",
    "Full",
    "H2O",
    "LayerView",
    "Plan",
    "Policy",
    "PyramidKV",
    "Random",
    "Request",
    "Selection",
    "SnapKV",
    "StreamingLLM",
    "VLCache",
    "make_policy",
]
