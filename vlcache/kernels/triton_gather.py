"""Triton: compaction, the kept entries of every head of a layer gathered into the new cache in one launch.

Grid: (batch * KV head, kept blocks); each program copies its rows of keys and of values. Same signature as
`reference.gather_kv`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_kernel(
    KIN, VIN, IDX, KOUT, VOUT,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    HK, K, DK, DV,
    BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = pid_bh // HK
    h = pid_bh % HK
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = cols < K
    src = tl.load(IDX + pid_bh * K + cols, mask=ok, other=0)
    dk = tl.arange(0, BLOCK_DK)
    mk = ok[:, None] & (dk[None, :] < DK)
    k = tl.load(KIN + b * skb + h * skh + src[:, None] * skt + dk[None, :] * skd, mask=mk)
    tl.store(KOUT + (pid_bh * K + cols)[:, None] * DK + dk[None, :], k, mask=mk)
    dv = tl.arange(0, BLOCK_DV)
    mv = ok[:, None] & (dv[None, :] < DV)
    v = tl.load(VIN + b * svb + h * svh + src[:, None] * svt + dv[None, :] * svd, mask=mv)
    tl.store(VOUT + (pid_bh * K + cols)[:, None] * DV + dv[None, :], v, mask=mv)


def gather_kv(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, HK, T, DK = keys.shape
    DV = values.shape[-1]
    if index.shape[:2] != (B, HK):
        raise ValueError(f"gather_kv: index {tuple(index.shape)} does not match keys {tuple(keys.shape)}")
    K = index.shape[-1]
    # No range check here: it would cost two device syncs per layer; callers pass indices from topk / sort over
    # [0, T), and the reference (torch.gather) is where to debug an index.
    idx = index.to(torch.int32).contiguous()
    k_out = torch.empty(B, HK, K, DK, device=keys.device, dtype=keys.dtype)
    v_out = torch.empty(B, HK, K, DV, device=values.device, dtype=values.dtype)
    if K:
        block_k = 64
        _gather_kernel[(B * HK, triton.cdiv(K, block_k))](
            keys, values, idx, k_out, v_out, *keys.stride(), *values.stride(), HK, K, DK, DV,
            BLOCK_K=block_k, BLOCK_DK=max(16, triton.next_power_of_2(DK)), BLOCK_DV=max(16, triton.next_power_of_2(DV)),
        )  # fmt: skip
    return k_out, v_out
