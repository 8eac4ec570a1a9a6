"""Hot-path operations behind one dispatcher: Triton kernels on CUDA where they exist, the PyTorch reference
elsewhere. Policies call only the names exported here."""

from . import reference
from .reference import AttentionStats, group_reduce, pool1d

_BACKEND = {"name": "reference"}


def backend() -> str:
    """'reference' or 'triton': what the dispatcher uses for CUDA tensors."""
    return _BACKEND["name"]


def attention_probs(q, k, scale, q_pos, k_valid=None):
    return reference.attention_probs(q, k, scale, q_pos, k_valid)


def attention_stats(q, k, scale, q_pos, k_valid=None, q_valid=None, *, with_sq=False, density_fraction=None, chunk=256):
    return reference.attention_stats(
        q, k, scale, q_pos, k_valid, q_valid, with_sq=with_sq, density_fraction=density_fraction, chunk=chunk
    )


def gather_kv(keys, values, index):
    return reference.gather_kv(keys, values, index)


def similarity_assign(keys, kept, *, chunk=1024, eps=1e-6):
    return reference.similarity_assign(keys, kept, chunk=chunk, eps=eps)


def position_assign(positions, anchors):
    return reference.position_assign(positions, anchors)


def merge_kv(keys, values, kept, merged, assign, mode="average", weight=None):
    return reference.merge_kv(keys, values, kept, merged, assign, mode, weight)


__all__ = [
    "AttentionStats",
    "attention_probs",
    "attention_stats",
    "backend",
    "gather_kv",
    "group_reduce",
    "merge_kv",
    "pool1d",
    "position_assign",
    "similarity_assign",
]
