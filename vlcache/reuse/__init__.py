"""Image KV reuse across requests (EPIC): the store and key re-rotation. The linking itself, which drives the model,
is in vlcache.hf.reuse."""

from .rope import rerotate
from .store import Chunk, CorruptChunkError, ImageKVStore, chunk_key

__all__ = ["Chunk", "CorruptChunkError", "ImageKVStore", "chunk_key", "rerotate"]
