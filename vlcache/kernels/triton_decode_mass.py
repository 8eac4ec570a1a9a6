"""Triton: decode attention over a per-KV-head cache (flash-decoding), and optionally each slot's attention mass
(H2O's and CAKE's scores, no second pass).

A decode step has a few query rows per head, so a kernel parallel over heads alone runs B * Hk programs (4 on
Qwen2-VL-7B at batch 1, on 132 SMs): each would stream its whole head. Here the keys are split too: grid
(B * Hk, splits), splits chosen for about four programs per SM. Each program takes all g * R query rows of one KV
head's group against its range of keys in BLOCK_T tiles (online softmax: running max, sum and output), and writes
its partial result; a second launch combines the splits (log-sum-exp) into the output. With `mass`, each tile's
logits are stored too (g * R fp32 per slot, a small fraction of a key's bytes) and a third launch turns them into
probabilities with the global row max and sum, summed over the group's rows into the mass.

16-bit inputs take 16-bit dots with fp32 accumulation (tensor cores, as SDPA does; the probabilities are rounded to
the values' dtype for the second dot); fp32 inputs take ieee fp32 dots (TF32 would keep 10 mantissa bits on Ampere
and later, off from the reference). Same signature as `reference.decode_attention`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_stats import INTERPRET

BLOCK_T = 64  # keys per tile
# the combine launch walks the splits one after another (one program per KV head): at batch 1 and 128K tokens kept
# at 10% (210 tiles a KV head), 4 programs per SM would make 105 splits of 2 tiles each; 4 tiles a split or more
# gives 42 splits of 5, which still leaves a program for every SM (168 on 132)
MIN_TILES = 4


# sizes that change with the cache are not specialised on (Triton compiles a variant for 1 and for multiples of 16):
# a new capacity must not compile a new kernel, least of all while a CUDA graph is being recorded
@triton.jit(do_not_specialize=["T", "SPLITS", "PER_SPLIT"])
def _split_kernel(
    Q, K, V, VALID, QPOS, LOGITS, PM, PL, PACC,
    sqb, sqh, sqr, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    HK, R, GR, T, D, DV, SPLITS, PER_SPLIT, scale,
    HAS_QPOS: tl.constexpr, MASS: tl.constexpr, LOWP: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // HK).to(tl.int64)  # int64 offsets: B * Hk * C * d passes 2**31 at batch 32 and 128K slots
    h = (pid_bh % HK).to(tl.int64)
    rows = tl.arange(0, BLOCK_R)  # row i of the group: query head h * g + i // R, query row i % R
    row_ok = rows < GR
    qh = h * (GR // R) + rows // R
    qr = rows % R
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        Q + b * sqb + qh[:, None] * sqh + qr[:, None] * sqr + d[None, :] * sqd,
        mask=row_ok[:, None] & (d[None, :] < D),
        other=0.0,
    )
    if not LOWP:
        q = q.to(tl.float32)
    if HAS_QPOS:
        qp = tl.load(QPOS + b * R + qr, mask=row_ok, other=-1)
    else:
        qp = rows  # unused
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    start = pid_s * PER_SPLIT
    for t0 in range(start, start + PER_SPLIT, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < T
        k = tl.load(
            K + b * skb + h * skh + t[:, None] * skt + d[None, :] * skd,
            mask=t_ok[:, None] & (d[None, :] < D),
            other=0.0,
        )
        if LOWP:
            s = tl.dot(q, tl.trans(k)) * scale  # [BLOCK_R, BLOCK_T], fp32
        else:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        vis = tl.load(VALID + pid_bh * T + t, mask=t_ok, other=0) != 0
        see = row_ok[:, None] & vis[None, :]
        if HAS_QPOS:
            see = see & (t[None, :] <= qp[:, None])
        s = tl.where(see, s, float("-inf"))
        if MASS:
            tl.store(
                LOGITS + (pid_bh * BLOCK_R + rows[:, None]) * T + t[None, :], s, mask=row_ok[:, None] & t_ok[None, :]
            )
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet: every term is 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            V + b * svb + h * svh + t[:, None] * svt + dv[None, :] * svd,
            mask=t_ok[:, None] & (dv[None, :] < DV),
            other=0.0,
        )
        if LOWP:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        m_i = m_new
    part = (pid_bh * SPLITS + pid_s) * BLOCK_R + rows
    tl.store(PM + part, m_i)
    tl.store(PL + part, l_i)
    tl.store(PACC + part[:, None] * BLOCK_DV + dv[None, :], acc)


@triton.jit(do_not_specialize=["SPLITS"])
def _combine_kernel(
    PM, PL, PACC, OUT, M, INV_L,
    sob, soh, sor, sod,
    HK, R, GR, DV, SPLITS,
    MASS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    b = pid_bh // HK
    h = pid_bh % HK
    rows = tl.arange(0, BLOCK_R)
    dv = tl.arange(0, BLOCK_DV)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)
    for i in range(0, SPLITS):  # the splits' partial softmaxes, combined as they come (log-sum-exp)
        part = (pid_bh * SPLITS + i) * BLOCK_R + rows
        pm = tl.load(PM + part)
        m_new = tl.maximum(m, pm)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: every term is 0
        alpha = tl.exp(m - m_safe)
        w = tl.exp(pm - m_safe)
        total = total * alpha + w * tl.load(PL + part)
        acc = acc * alpha[:, None] + w[:, None] * tl.load(PACC + part[:, None] * BLOCK_DV + dv[None, :])
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)  # a row that sees no slot: total 0, output zeros
    inv_l = tl.where(total > 0, 1.0 / tl.maximum(total, 1e-30), 0.0)  # total >= 1 wherever a row sees a slot
    qh = h * (GR // R) + rows // R
    qr = rows % R
    tl.store(
        OUT + b * sob + qh[:, None] * soh + qr[:, None] * sor + dv[None, :] * sod,
        (acc * inv_l[:, None]).to(OUT.dtype.element_ty),
        mask=(rows[:, None] < GR) & (dv[None, :] < DV),
    )
    if MASS:
        tl.store(M + pid_bh * BLOCK_R + rows, m)
        tl.store(INV_L + pid_bh * BLOCK_R + rows, inv_l)


@triton.jit(do_not_specialize=["T"])
def _mass_kernel(
    LOGITS, M, L, MASS, GR, T, inv_g,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tl.arange(0, BLOCK_R)
    ok = (rows[:, None] < GR) & (t[None, :] < T)
    s = tl.load(LOGITS + (pid_bh * BLOCK_R + rows[:, None]) * T + t[None, :], mask=ok, other=float("-inf"))
    m = tl.load(M + pid_bh * BLOCK_R + rows)
    inv_l = tl.load(L + pid_bh * BLOCK_R + rows)
    p = tl.exp(s - m[:, None]) * inv_l[:, None]
    p = tl.where(ok, p, 0.0)
    tl.store(MASS + pid_bh * T + t, tl.sum(p, axis=0) * inv_g, mask=t < T)


@functools.cache
def _programs(device: torch.device) -> int:
    """About four programs per SM fill a GPU; the interpreter gets a few, so that its tests still split the keys."""
    if INTERPRET or device.type != "cuda":
        return 16
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def splits(bh: int, T: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys per split): whole tiles per split, at least MIN_TILES of them, enough splits for the GPU, none
    empty."""
    tiles = triton.cdiv(T, BLOCK_T)
    n = max(1, min(tiles // MIN_TILES, triton.cdiv(_programs(device), bh)))
    per = triton.cdiv(tiles, n) * BLOCK_T
    return triton.cdiv(T, per), per


def decode_attention(query, keys, values, k_valid, scale, q_pos=None, mass=True):
    B, H, R, D = query.shape
    HK, T, DV = keys.shape[1], keys.shape[2], values.shape[-1]
    if keys.shape[0] != B or H % HK or k_valid.shape != (B, HK, T):
        raise ValueError(
            f"decode_attention: query {tuple(query.shape)}, keys {tuple(keys.shape)} and k_valid "
            f"{tuple(k_valid.shape)} do not fit ([B, H, R, d], [B, Hk, T, d], [B, Hk, T])"
        )
    GR = (H // HK) * R
    BLOCK_R = max(16, triton.next_power_of_2(GR))  # tl.dot wants 16 rows at least: the rest are masked
    BLOCK_DV = max(16, triton.next_power_of_2(DV))
    dev = query.device
    n, per = splits(B * HK, T, dev)
    # 16-bit dots natively; the interpreter's 16-bit arithmetic is not faithful (numpy has no bfloat16): fp32 there,
    # so the 16-bit path is compared with the reference on a GPU only (scripts/gpu_check.sh)
    lowp = (
        not INTERPRET and query.dtype in (torch.bfloat16, torch.float16) and keys.dtype == values.dtype == query.dtype
    )
    valid = k_valid.contiguous()
    valid = valid.view(torch.int8) if valid.dtype == torch.bool else valid.to(torch.int8)  # a view: no copy
    qpos = q_pos.to(torch.int32).contiguous() if q_pos is not None else valid
    logits = torch.empty(B * HK, BLOCK_R, T if mass else 1, device=dev, dtype=torch.float32)
    pm = torch.empty(B * HK, n, BLOCK_R, device=dev, dtype=torch.float32)
    pl = torch.empty_like(pm)
    pacc = torch.empty(B * HK, n, BLOCK_R, BLOCK_DV, device=dev, dtype=torch.float32)
    _split_kernel[(B * HK, n)](
        query, keys, values, valid, qpos, logits, pm, pl, pacc,
        *query.stride(), *keys.stride(), *values.stride(),
        HK, R, GR, T, D, DV, n, per, float(scale),
        HAS_QPOS=q_pos is not None, MASS=mass, LOWP=lowp, BLOCK_R=BLOCK_R, BLOCK_T=BLOCK_T,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=BLOCK_DV,
    )  # fmt: skip
    out = torch.empty(B, H, R, DV, device=dev, dtype=query.dtype)
    m = torch.empty(B * HK, BLOCK_R, device=dev, dtype=torch.float32)
    inv_l = torch.empty_like(m)
    _combine_kernel[(B * HK,)](
        pm, pl, pacc, out, m, inv_l, *out.stride(), HK, R, GR, DV, n,
        MASS=mass, BLOCK_R=BLOCK_R, BLOCK_DV=BLOCK_DV,
    )  # fmt: skip
    if not mass:
        return out, None
    weights = torch.empty(B, HK, T, device=dev, dtype=torch.float32)
    _mass_kernel[(B * HK, triton.cdiv(T, BLOCK_T))](
        logits, m, inv_l, weights, GR, T, 1.0 / (H // HK), BLOCK_R=BLOCK_R, BLOCK_T=BLOCK_T
    )  # fmt: skip
    return out, weights
