"""The dispatcher's ops that run inside a compiled decode step, registered as torch custom ops.

Dynamo would otherwise trace into them: into the Triton launch and its host-side setup (grid sizes from a dynamic
capacity, scratch buffers, the log-sum-exp combine) on CUDA, and into the reference's tensors elsewhere. As a custom
op each is one opaque node with a fake implementation for its shapes: inductor calls it as it is, a CUDA graph
captures the launches inside it, and the CPU tests take the same path through the compiler as a GPU does.

No `from __future__ import annotations` here: torch infers each op's schema from real annotations.
"""

import torch

from . import reference


def _impl(query, keys, values, k_valid, scale, q_pos, mass):
    from . import _triton_module, _use_triton  # the package imports this module

    mod = _triton_module("triton_decode_mass") if _use_triton(query) else None
    return (mod.decode_attention if mod is not None else reference.decode_attention)(
        query, keys, values, k_valid, scale, q_pos, mass
    )


@torch.library.custom_op("vlcache::decode_attention", mutates_args=())
def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    k_valid: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor | None = None,
    mass: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`kernels.decode_attention` as one op; without `mass` its second output is empty (an op returns tensors)."""
    out, weights = _impl(query, keys, values, k_valid, scale, q_pos, mass)
    return out, weights if weights is not None else query.new_empty(0, dtype=torch.float32)


@decode_attention.register_fake
def _(query, keys, values, k_valid, scale, q_pos=None, mass=True):
    B, H, R, _ = query.shape
    out = query.new_empty(B, H, R, values.shape[-1])
    shape = (B, keys.shape[1], keys.shape[2]) if mass else (0,)
    return out, query.new_empty(shape, dtype=torch.float32)
