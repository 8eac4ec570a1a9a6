"""Everything that depends on transformers internals lives in this package: the cache subclass, the registered
attention functions, the forward hooks and the model discovery. When transformers changes, look here."""

from .cache import CompressedCache, CompressibleLayer
from .quantized import QuantizedLayer
from .session import Session

__all__ = ["CompressibleLayer", "QuantizedLayer", "Session", "CompressedCache"]
