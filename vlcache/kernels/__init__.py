"""Hot-path operations behind one dispatcher: the Triton kernel for CUDA tensors, the PyTorch reference elsewhere
(or everywhere with VLCACHE_KERNELS=reference). Policies call only the names exported here.

| op | Triton | reference |
|---|---|---|
| attention_stats | triton_stats.py (two passes from the row log-sum-exp) | reference.attention_stats (row tiles) |
| similarity_assign | triton_similarity.py (streaming max over kept keys) | reference.similarity_assign (slot tiles) |
| merge_kv | triton_merge.py (fp32 atomics, one pass) | reference.merge_kv (scatter_add) |
| gather_kv | triton_gather.py (one launch for keys and values) | reference.gather_kv (torch.gather) |
| quantized_attention | triton_quant.py (codes dequantized in registers, parts combined by log-sum-exp) | reference.quantized_attention (dequantize, one softmax) |
| decode_attention | triton_decode_mass.py (flash-decoding: keys split over programs, a combine launch; the per-slot attention mass when asked) | reference.decode_attention (one softmax) |

`attention_probs` (a handful of rows x all keys), `pool1d`, `group_reduce` and `position_assign` are small or
memory-light and stay in PyTorch.
"""

from __future__ import annotations

import importlib
import os

import torch

from . import compiled_ops, reference
from .reference import AttentionStats, group_reduce, pool1d, position_assign

_TRITON: dict = {}


def _triton_module(name: str):
    """The Triton implementation module, or None when Triton is absent (imported on first use)."""
    if name not in _TRITON:
        try:
            _TRITON[name] = importlib.import_module(f".{name}", __name__)
        except ImportError:
            _TRITON[name] = None
    return _TRITON[name]


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("VLCACHE_KERNELS", "auto") != "reference"


def backend(device: str | torch.device = "cuda") -> str:
    """'triton' or 'reference': what the dispatcher runs for tensors on `device`."""
    if torch.device(device).type == "cuda" and os.environ.get("VLCACHE_KERNELS", "auto") != "reference":
        return "triton" if _triton_module("triton_gather") is not None else "reference"
    return "reference"


def attention_probs(q, k, scale, q_pos, k_valid=None):
    return reference.attention_probs(q, k, scale, q_pos, k_valid)


def attention_stats(q, k, scale, q_pos, k_valid=None, q_valid=None, *, with_sq=False, density_fraction=None, chunk=256):
    mod = _triton_module("triton_stats") if _use_triton(q) else None
    impl = mod.attention_stats if mod is not None else reference.attention_stats
    return impl(q, k, scale, q_pos, k_valid, q_valid, with_sq=with_sq, density_fraction=density_fraction, chunk=chunk)


def similarity_assign(keys, kept, *, chunk=1024, eps=1e-6):
    mod = _triton_module("triton_similarity") if _use_triton(keys) else None
    impl = mod.similarity_assign if mod is not None else reference.similarity_assign
    return impl(keys, kept, chunk=chunk, eps=eps)


def merge_kv(keys, values, kept, merged, assign, mode="average", weight=None):
    mod = _triton_module("triton_merge") if _use_triton(keys) else None
    impl = mod.merge_kv if mod is not None else reference.merge_kv
    return impl(keys, values, kept, merged, assign, mode, weight)


def gather_kv(keys, values, index):
    mod = _triton_module("triton_gather") if _use_triton(keys) else None
    impl = mod.gather_kv if mod is not None else reference.gather_kv
    return impl(keys, values, index)


def quantized_attention(query, parts, scale):
    mod = _triton_module("triton_quant") if _use_triton(query) else None
    impl = mod.quantized_attention if mod is not None else reference.quantized_attention
    return impl(query, parts, scale)


def decode_attention(query, keys, values, k_valid, scale, q_pos=None, mass=True):
    if torch.compiler.is_compiling():  # one opaque custom op inside a compiled step (compiled_ops.py says why)
        out, weights = torch.ops.vlcache.decode_attention(query, keys, values, k_valid, float(scale), q_pos, mass)
        return out, weights if mass else None
    return compiled_ops._impl(query, keys, values, k_valid, scale, q_pos, mass)


__all__ = [
    "AttentionStats",
    "attention_probs",
    "attention_stats",
    "backend",
    "decode_attention",
    "gather_kv",
    "group_reduce",
    "merge_kv",
    "pool1d",
    "position_assign",
    "quantized_attention",
    "similarity_assign",
]
