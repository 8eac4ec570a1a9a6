"""A store of image KV chunks: bounded by bytes with least-recently-used eviction, thread-safe, with an optional
on-disk tier (safetensors, never pickle).

A chunk is the KV of one image's token span (its markers included), computed with the image alone at position 0,
plus the input embeddings of those tokens (so a reused image skips the vision tower). Keys are full SHA-256 digests
of the pixel data and of everything that changes the KV: model, dtype, processor settings. A truncated hash could
collide and answer about the wrong picture, or another user's.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = "vlcache-chunk-1"


class CorruptChunkError(ValueError):
    """An on-disk chunk whose contents do not match its checksum or its name."""


@dataclass
class Chunk:
    """One image's KV: keys/values per decoder layer [Hk, n, d] (post-RoPE, computed at position `base`) and the
    input embeddings [n, hidden] of its tokens."""

    key: str
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    embeds: torch.Tensor
    base: int = 0

    @property
    def length(self) -> int:
        return self.embeds.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values, self.embeds])

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"embeds": self.embeds}
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            out[f"k.{i}"], out[f"v.{i}"] = k, v
        return {name: t.detach().cpu().contiguous() for name, t in out.items()}


def chunk_key(pixels: torch.Tensor, *parts) -> str:
    """Full SHA-256 of an image's pixel tensor (values, shape, dtype) and of `parts` (model id, dtype, processor
    settings...), as a hex string."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    p = pixels.detach().cpu().contiguous()
    h.update(str((tuple(p.shape), str(p.dtype))).encode())
    h.update(p.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).reshape(-1).numpy().tobytes())
    return h.hexdigest()


class ImageKVStore:
    """Image chunks in memory (at most `max_bytes`, least recently used evicted first) and, with `disk_dir`, on
    disk as well (one safetensors file per chunk; a chunk evicted from memory is read back from disk)."""

    def __init__(self, max_bytes: int = 1 << 30, disk_dir: str | Path | None = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        if self.disk_dir is not None:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
        self._memory: OrderedDict[str, Chunk] = OrderedDict()
        self._lock = threading.RLock()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for c in self._memory.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._memory)

    def keys(self) -> list[str]:
        """In-memory keys, least recently used first."""
        with self._lock:
            return list(self._memory)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._memory or (self.disk_dir is not None and self._path(key).exists())

    def get(self, key: str) -> Chunk | None:
        with self._lock:
            chunk = self._memory.get(key)
            if chunk is not None:
                self._memory.move_to_end(key)
                self.hits += 1
                return chunk
            if self.disk_dir is not None and self._path(key).exists():
                chunk = self._load(key)
                self._insert(chunk)
                self.hits += 1
                return chunk
            self.misses += 1
            return None

    def put(self, chunk: Chunk) -> None:
        with self._lock:
            if self.disk_dir is not None and not self._path(chunk.key).exists():
                self._save(chunk)
            self._insert(chunk)

    def clear(self) -> None:
        with self._lock:
            self._memory.clear()

    def _insert(self, chunk: Chunk) -> None:
        self._memory[chunk.key] = chunk
        self._memory.move_to_end(chunk.key)
        total = sum(c.nbytes for c in self._memory.values())
        while total > self.max_bytes and self._memory:
            _, old = self._memory.popitem(last=False)
            total -= old.nbytes

    def _path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a chunk key (a 64-digit SHA-256 hex digest): {key!r}")
        return self.disk_dir / f"{key}.safetensors"

    def _save(self, chunk: Chunk) -> None:
        from safetensors.torch import save_file

        tensors = chunk.tensors()
        meta = {
            "format": FORMAT,
            "key": chunk.key,
            "layers": str(len(chunk.keys)),
            "base": str(chunk.base),
            "checksum": _checksum(tensors),
        }
        tmp = self._path(chunk.key).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(self._path(chunk.key))  # a reader never sees half a file

    def _load(self, key: str) -> Chunk:
        from safetensors import safe_open

        path = self._path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:
            raise CorruptChunkError(f"cannot read chunk file {path.name}: {e}") from e
        if meta.get("format") != FORMAT or meta.get("key") != key:
            raise CorruptChunkError(f"chunk file {path.name} is not a vlcache chunk for this key")
        if _checksum(tensors) != meta.get("checksum"):
            raise CorruptChunkError(f"chunk file {path.name} is corrupted: its contents do not match its checksum")
        layers = int(meta["layers"])
        return Chunk(
            key,
            [tensors[f"k.{i}"] for i in range(layers)],
            [tensors[f"v.{i}"] for i in range(layers)],
            tensors["embeds"],
            int(meta.get("base", 0)),
        )
