"""Triton: fold evicted entries into their assigned kept entry (LOOK-M's merges, Elastic Cache's scatter-mean).

    x' = (x + sum_i src_i) / (n_x + 1),  src_i = y_i (average), (y_i + x) / 2 (pivot), s_i * y_i (weighted)

One pass over the slots (grid: batch * KV head, slot blocks) adds each merged slot's contribution to its target
with fp32 atomics; the division happens once at the end. Same signature as `reference.merge_kv`; the fp32 sums may
add in another order than the reference (atomics), so results agree to rounding, not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gather import gather_kv

MODES = {"average": 0, "pivot": 1, "weighted": 2}


@triton.jit
def _scatter_kernel(
    X, KEPT, MERGED, ASSIGN, WEIGHT, ACC, CNT,
    sxb, sxh, sxt, sxd,
    HK, T, K, D,
    MODE: tl.constexpr, COUNT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bh // HK
    h = pid_bh % HK
    slots = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    dd = tl.arange(0, BLOCK_D)
    ok = slots < T
    row = pid_bh * T + slots  # MERGED, ASSIGN, WEIGHT are contiguous [B, Hk, T]
    merged = (tl.load(MERGED + row, mask=ok, other=0) != 0) & ok
    target = tl.load(ASSIGN + row, mask=ok, other=0)
    dmask = merged[:, None] & (dd[None, :] < D)
    base = X + b * sxb + h * sxh
    src = tl.load(base + slots[:, None] * sxt + dd[None, :] * sxd, mask=dmask, other=0.0).to(tl.float32)
    if MODE == 1:
        kslot = tl.load(KEPT + pid_bh * K + target, mask=merged, other=0)
        pivot = tl.load(base + kslot[:, None] * sxt + dd[None, :] * sxd, mask=dmask, other=0.0).to(tl.float32)
        src = (src + pivot) * 0.5
    elif MODE == 2:
        w = tl.load(WEIGHT + row, mask=merged, other=0.0)
        src = src * w[:, None]
    tl.atomic_add(ACC + (pid_bh * K + target)[:, None] * D + dd[None, :], src, mask=dmask)
    if COUNT:
        tl.atomic_add(CNT + pid_bh * K + target, tl.full([BLOCK_T], 1.0, tl.float32), mask=merged)


def merge_kv(keys, values, kept, merged, assign, mode: str = "average", weight=None):
    if mode not in MODES:
        raise ValueError(f"merge mode must be 'average', 'pivot' or 'weighted', got {mode!r}")
    if mode == "weighted" and weight is None:
        raise ValueError("the weighted merge needs weight (the cosine similarities)")
    B, HK, T, _ = keys.shape
    K = kept.shape[-1]
    kept32 = kept.to(torch.int32).contiguous()
    merged8 = merged.to(torch.int8).contiguous()
    assign32 = assign.to(torch.int32).contiguous()
    w = (weight if weight is not None else torch.zeros(1, device=keys.device)).float().contiguous()
    count = torch.zeros(B, HK, K, device=keys.device, dtype=torch.float32)
    base_k, base_v = gather_kv(keys, values, kept)
    out = []
    for i, x in enumerate((keys, values)):
        D = x.shape[-1]
        acc = torch.zeros(B, HK, K, D, device=x.device, dtype=torch.float32)
        block_d = max(16, triton.next_power_of_2(D))
        block_t = 64 if block_d <= 64 else 32
        if T > 0 and K > 0:
            _scatter_kernel[(B * HK, triton.cdiv(T, block_t))](
                x, kept32, merged8, assign32, w, acc, count, *x.stride(), HK, T, K, D,
                MODE=MODES[mode], COUNT=i == 0, BLOCK_T=block_t, BLOCK_D=block_d,
            )  # fmt: skip
        out.append(acc)
    denom = (count + 1.0)[..., None]
    return ((base_k.float() + out[0]) / denom).to(keys.dtype), ((base_v.float() + out[1]) / denom).to(values.dtype)
