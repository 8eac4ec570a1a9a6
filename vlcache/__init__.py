"""vlcache: modality-aware KV-cache compression for Hugging Face vision-language models.

    import vlcache
    model, processor = vlcache.load_model("embedded")  # or a hub id / local directory
    frames = vlcache.read_frames(vlcache.sample_videos()[0], frames=8)
    inputs = vlcache.frames_inputs(processor, frames, "describe?", device=model.device)
    with vlcache.compress(model, "vlcache", vision_budget=0.1) as session:
        out = model.generate(**inputs, max_new_tokens=9)
    print(session.stats.summary())

Importing vlcache patches nothing and imports nothing heavy: the names below load on first use, so
`vlcache.policies`, `vlcache.modality` and `vlcache.kernels` work without transformers installed (only the
Hugging Face adapter, `vlcache.hf`, needs it). Attaching a policy touches only the model it is given.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# `vlcache.reuse` is both a subpackage (the image KV store, torch only) and the public function `reuse`. Python
# binds a subpackage to its parent's attribute when it is first imported, which would hide the function; loading
# the subpackage here, first, and unbinding the name leaves `vlcache.reuse` to `__getattr__` (the function).
from . import reuse as _image_kv_store  # noqa: E402, F401

del reuse  # noqa: F821

# public name -> the submodule that defines it, or (submodule, its name there). The getting-started helpers are
# reached only through these names, so the README does not depend on where the apps' modules live (vlcache/apps/).
_EXPORTS = {
    "load_model": (".apps.model_loading", "load"),
    "frames_inputs": ".apps.prompts",
    "read_frames": ".apps.video",
    "sample_videos": (".apps.samples", "ensure_samples"),
    "attach": ".api",
    "compress": ".api",
    "last_stats": ".api",
    "reuse": ".api",
    "Layout": ".modality",
    "Modality": ".modality",
    "UnsupportedModelError": ".modality",
    "POLICIES": ".policies",
    "Policy": ".policies",
    "make_policy": ".policies",
    "ImageKVStore": ".reuse",
    "CompressionStats": ".compression_stats",
}

__all__ = [
    "POLICIES",
    "CompressionStats",
    "ImageKVStore",
    "Layout",
    "Modality",
    "Policy",
    "UnsupportedModelError",
    "attach",
    "compress",
    "frames_inputs",
    "last_stats",
    "load_model",
    "make_policy",
    "read_frames",
    "reuse",
    "sample_videos",
]

if TYPE_CHECKING:  # for editors and type checkers; at run time `__getattr__` imports on demand
    from .api import attach, compress, last_stats, reuse
    from .apps.model_loading import load as load_model
    from .apps.prompts import frames_inputs
    from .apps.samples import ensure_samples as sample_videos
    from .apps.video import read_frames
    from .compression_stats import CompressionStats
    from .modality import Layout, Modality, UnsupportedModelError
    from .policies import POLICIES, Policy, make_policy
    from .reuse import ImageKVStore


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'vlcache' has no attribute {name!r}")
    module, attr = target if isinstance(target, tuple) else (target, name)
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
