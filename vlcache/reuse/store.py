"""A store of image KV chunks: bounded by bytes with least-recently-used eviction, thread-safe, with an optional
on-disk tier (safetensors, never pickle).

The disk tier is a cache, so it never fails a request: a corrupt or unreadable file is a miss with a warning (a
corrupt one is deleted, so the image is compiled again and written anew), and a full or read-only disk leaves
the chunk in memory with a warning. Several processes may share one `disk_dir`: each writes under a temporary
name of its own and renames it into place, which is atomic, so a reader sees a whole file or none.

A chunk is the KV of one image's token span (its markers included), computed with the image alone at position 0,
plus the input embeddings of those tokens (so a reused image skips the vision tower). Keys are full SHA-256 digests
of the pixel data and of everything that changes the KV: model, dtype, processor settings. A truncated hash could
collide and answer about the wrong picture, or another user's.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import uuid
import warnings
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
        self._memory: OrderedDict[str, Chunk] = OrderedDict()
        self._lock = threading.RLock()
        self.hits = self.misses = 0
        self._warned_write = False
        if self.disk_dir is not None:
            try:
                self.disk_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self._write_failed(e)

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
            chunk = self._from_disk(key) if self.disk_dir is not None else None
            if chunk is not None:
                self._insert(chunk)
                self.hits += 1
                return chunk
            self.misses += 1
            return None

    def put(self, chunk: Chunk) -> None:
        with self._lock:
            if self.disk_dir is not None and not self._path(chunk.key).exists():
                try:
                    self._save(chunk)
                except OSError as e:
                    self._write_failed(e)
            self._insert(chunk)

    def load(self, key: str) -> Chunk | None:
        """The chunk on disk under `key` (None if there is none); raises CorruptChunkError for a bad file."""
        if self.disk_dir is None:
            return None
        try:
            data = self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        return _parse(key, self._path(key).name, data)

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

    def _from_disk(self, key: str) -> Chunk | None:
        try:
            return self.load(key)
        except CorruptChunkError as e:
            warnings.warn(f"{e}; dropped it, the image will be compiled again", RuntimeWarning, stacklevel=3)
            self._path(key).unlink(missing_ok=True)
        except OSError as e:
            warnings.warn(
                f"cannot read chunk file {self._path(key).name} ({e}); compiling the image again",
                RuntimeWarning,
                stacklevel=3,
            )
        return None

    def _write_failed(self, error: OSError) -> None:
        if not self._warned_write:  # once per store: a full disk would otherwise warn on every image
            warnings.warn(
                f"image KV store: cannot write to {self.disk_dir} ({error}); keeping chunks in memory only",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned_write = True

    def _save(self, chunk: Chunk) -> None:
        from safetensors import torch as st

        tensors = chunk.tensors()
        meta = {
            "format": FORMAT,
            "key": chunk.key,
            "layers": str(len(chunk.keys)),
            "base": str(chunk.base),
            "checksum": _checksum(tensors),
        }
        final = self._path(chunk.key)
        # a name no other thread or process uses: two writers of one key must not rename each other's file away
        tmp = final.with_name(f"{chunk.key}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            st.save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, final)  # atomic: a reader never sees half a file
        finally:
            tmp.unlink(missing_ok=True)


def _parse(key: str, name: str, data: bytes) -> Chunk:
    """A chunk from a file's bytes, checked against its name and its checksum."""
    from safetensors.torch import load

    try:
        (size,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        tensors = load(data)
    except Exception as e:  # safetensors raises its own error type for a bad header or short data
        raise CorruptChunkError(f"cannot read chunk file {name}: {e}") from e
    if meta.get("format") != FORMAT or meta.get("key") != key:
        raise CorruptChunkError(f"chunk file {name} is not a vlcache chunk for this key")
    if _checksum(tensors) != meta.get("checksum"):
        raise CorruptChunkError(f"chunk file {name} is corrupted: its contents do not match its checksum")
    try:
        layers = int(meta["layers"])
        return Chunk(
            key,
            [tensors[f"k.{i}"] for i in range(layers)],
            [tensors[f"v.{i}"] for i in range(layers)],
            tensors["embeds"],
            int(meta.get("base", 0)),
        )
    except (KeyError, ValueError) as e:
        raise CorruptChunkError(f"chunk file {name} lacks {e}") from e
