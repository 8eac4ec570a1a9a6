"""vlcache: modality-aware KV-cache compression for Hugging Face vision-language models.

    import vlcache
    from vlcache.policies import SnapKV
    with vlcache.compress(model, SnapKV(budget=0.1)):
        out = model.generate(**inputs, max_new_tokens=128)
    print(vlcache.last_stats(model).summary())

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

# public name -> the submodule that defines it
_EXPORTS = {
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
    "CompressionStats": ".stats",
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
    "last_stats",
    "make_policy",
    "reuse",
]

if TYPE_CHECKING:  # for editors and type checkers; at run time `__getattr__` imports on demand
    from .api import attach, compress, last_stats, reuse
    from .modality import Layout, Modality, UnsupportedModelError
    from .policies import POLICIES, Policy, make_policy
    from .reuse import ImageKVStore
    from .stats import CompressionStats


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vlcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
