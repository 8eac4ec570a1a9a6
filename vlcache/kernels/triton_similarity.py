"""Triton: each slot's most cosine-similar kept key, per KV head, streaming over the kept keys.

Grid: (batch * KV head, slot blocks). A program normalises its block of slot keys once, then walks the kept keys
in blocks (gathered through the kept index list), keeping a running max and argmax: the [slots x kept]
similarity matrix never exists in memory. Ties go to the lower kept index, as in `reference.similarity_assign`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_stats import INTERPRET


@triton.jit
def _assign_kernel(
    KEYS, KEPT, ASSIGN, SIM,
    skb, skh, skt, skd,
    sxb, sxh, sxk,
    HK, T, K, D, eps,
    UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bh // HK
    h = pid_bh % HK
    slots = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    dd = tl.arange(0, BLOCK_D)
    base = KEYS + b * skb + h * skh
    x = tl.load(
        base + slots[:, None] * skt + dd[None, :] * skd, mask=(slots[:, None] < T) & (dd[None, :] < D), other=0.0
    ).to(tl.float32)
    x = x / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), eps)[:, None]
    best = tl.full([BLOCK_T], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_T], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kcols = k0 + tl.arange(0, BLOCK_K)
        kidx = tl.load(KEPT + b * sxb + h * sxh + kcols * sxk, mask=kcols < K, other=0)
        y = tl.load(
            base + kidx[:, None] * skt + dd[None, :] * skd, mask=(kcols[:, None] < K) & (dd[None, :] < D), other=0.0
        ).to(tl.float32)
        y = y / tl.maximum(tl.sqrt(tl.sum(y * y, 1)), eps)[:, None]
        # tf32x3 (three tf32 products): near-fp32 cosines on tensor cores, so a near tie resolves as in the
        # fp32 reference; plain tf32 flipped such ties on real hardware
        if UPCAST:
            s = tl.dot(x, tl.trans(y), input_precision="ieee")
        else:
            s = tl.dot(x, tl.trans(y), input_precision="tf32x3")
        s = tl.where(kcols[None, :] < K, s, float("-inf"))
        block_best = tl.max(s, 1)
        block_arg = tl.argmax(s, 1, tie_break_left=True).to(tl.int32) + k0
        better = block_best > best  # strict: an equal later block keeps the earlier index
        arg = tl.where(better, block_arg, arg)
        best = tl.where(better, block_best, best)
    out = pid_bh * T + slots
    tl.store(ASSIGN + out, arg, mask=slots < T)
    tl.store(SIM + out, best, mask=slots < T)


def similarity_assign(keys: torch.Tensor, kept: torch.Tensor, *, chunk: int | None = None, eps: float = 1e-6):
    B, HK, T, D = keys.shape
    if kept.shape[:2] != (B, HK):
        raise ValueError(f"similarity_assign: kept {tuple(kept.shape)} does not match keys {tuple(keys.shape)}")
    K = kept.shape[-1]
    if K == 0:
        raise ValueError("similarity_assign: nothing kept to assign to")
    kept = kept.to(torch.int32).contiguous()
    assign = torch.empty(B, HK, T, device=keys.device, dtype=torch.int32)
    sim = torch.empty(B, HK, T, device=keys.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(D))
    if INTERPRET:  # the interpreter pays per operation, not per element: wide tiles keep its tests quick
        cfg = dict(BLOCK_T=256, BLOCK_K=64)
    else:
        cfg = dict(BLOCK_T=64, BLOCK_K=64, num_warps=4, num_stages=2)
    if T > 0:
        _assign_kernel[(B * HK, triton.cdiv(T, cfg["BLOCK_T"]))](
            keys, kept, assign, sim, *keys.stride(), *kept.stride(), HK, T, K, D, float(eps),
            UPCAST=INTERPRET, BLOCK_D=block_d, **cfg,
        )  # fmt: skip
    return assign.long(), sim
