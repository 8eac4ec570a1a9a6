"""Moving cached keys to new positions: rotary embeddings compose, so a key computed at position p becomes the key
at p + delta by one more rotation, R(delta) K.

This holds for 1-D RoPE and for Qwen-VL's M-RoPE alike when a whole image moves: its t, h and w positions all shift
by the same delta, and the M-RoPE sections split the frequency bands between t, h and w, so every band turns by
delta * its frequency, as in 1-D. (HF's attention_scaling multiplies cos and sin once at compute time; a further
rotation must not scale again.)
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def rerotate(keys: torch.Tensor, delta: int | torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """keys [..., T, d] (post-RoPE, d = 2 * len(inv_freq)) moved by `delta` positions (an int or [T]), in fp32."""
    delta = torch.as_tensor(delta, dtype=torch.float32, device=keys.device)
    if delta.ndim == 0:
        delta = delta.expand(keys.shape[-2])
    angle = delta[:, None] * inv_freq.float().to(keys.device)[None, :]  # [T, d/2]
    emb = torch.cat([angle, angle], dim=-1)
    k = keys.float()
    return (k * emb.cos() + rotate_half(k) * emb.sin()).to(keys.dtype)
