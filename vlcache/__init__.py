"""vlcache: modality-aware KV-cache compression for Hugging Face vision-language models.

    import vlcache
    from vlcache.policies import SnapKV
    with vlcache.compress(model, SnapKV(budget=0.1)):
        out = model.generate(**inputs, max_new_tokens=128)
    print(vlcache.last_stats(model).summary())

Importing vlcache patches nothing; attaching a policy touches only the model it is given.
"""

from .api import attach, compress, last_stats, reuse
from .modality import Layout, Modality, UnsupportedModelError
from .policies import POLICIES, Policy, make_policy
from .reuse import ImageKVStore
from .stats import CompressionStats

__version__ = "0.1.0"

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
