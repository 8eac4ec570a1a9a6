"""Triton: column statistics of softmax(q k^T) over selected query rows, without a rows x keys matrix.

Two passes, FlashAttention-style:
1. per query row (grid: batch*head, row blocks): sweep the keys once for the running max m and sum l of
   exp(s - m), giving lse = m + log l; with `density_fraction` sweep again to count the keys whose logit is at least
   m + log(fraction), i.e. probability >= fraction * the row's largest probability (VL-Cache's ThresholdFilter);
2. per key block (grid: batch*head, key blocks): sweep the rows, p = exp(s - lse), and accumulate the column sum
   (and sum of squares, for CAKE's variance across rows).

Causal by slot (key j is visible to row r iff j <= q_pos[r]); padding keys and padding rows are skipped. GQA: query
head h reads KV head h // (H / Hk) by indexing, never by repeating K. Accumulation is fp32 whatever the input dtype.
Same signature and results as `reference.attention_stats`.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .reference import AttentionStats

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr):
    # the interpreter mishandles bf16/fp16 dots; on a GPU native low-precision dots accumulate in fp32 anyway
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, out_dtype=tl.float32)


@triton.jit
def _masked_logits(q, K, KVALID, b, hk, cols, dd, qpos, skb, skh, skt, skd, svb, svh, svt, T, D, scale,
                   HAS_KVALID: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """Logits of a row block against the key block `cols`, and which of them are visible (causal, not padding)."""
    k = tl.load(
        K + b * skb + hk * skh + cols[:, None] * skt + dd[None, :] * skd,
        mask=(cols[:, None] < T) & (dd[None, :] < D),
        other=0.0,
    )
    s = _dot(q, tl.trans(k), UPCAST) * scale
    vis = (cols[None, :] <= qpos[:, None]) & (cols[None, :] < T)
    if HAS_KVALID:
        kv = tl.load(KVALID + b * svb + hk * svh + cols * svt, mask=cols < T, other=0)
        vis = vis & (kv[None, :] != 0)
    return s, vis


@triton.jit
def _row_pass(
    Q, K, QPOS, KVALID, M_OUT, L_OUT, THRESH,
    sqb, sqh, sqr, sqd,
    skb, skh, skt, skd,
    spb, spr,
    svb, svh, svt,
    H, HK, R, T, D, scale, SPAN,
    HAS_KVALID: tl.constexpr, COUNT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One split of the keys (grid axis 2) for a block of rows. COUNT=False: the split's running max and sum of
    exp(s - max), combined across splits on the host; COUNT=True: how many keys of the split reach THRESH[row]."""
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HK)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < R
    q = tl.load(
        Q + b * sqb + h * sqh + rows[:, None] * sqr + dd[None, :] * sqd,
        mask=row_ok[:, None] & (dd[None, :] < D),
        other=0.0,
    )
    qpos = tl.load(QPOS + b * spb + rows * spr, mask=row_ok, other=-1)
    t_start = pid_s * SPAN
    t_end = tl.minimum(tl.minimum(T, t_start + SPAN), tl.max(qpos) + 1)  # causal: nothing past the last slot
    out = (pid_bh * tl.num_programs(2) + pid_s) * R + rows
    if COUNT:
        threshold = tl.load(THRESH + pid_bh * R + rows, mask=row_ok, other=float("inf"))
        count = tl.zeros([BLOCK_R], tl.float32)
        for t0 in range(t_start, t_end, BLOCK_T):
            s, vis = _masked_logits(q, K, KVALID, b, hk, t0 + tl.arange(0, BLOCK_T), dd, qpos,
                                    skb, skh, skt, skd, svb, svh, svt, T, D, scale, HAS_KVALID, UPCAST)  # fmt: skip
            count += tl.sum((vis & (s >= threshold[:, None])).to(tl.float32), 1)
        tl.store(M_OUT + out, count, mask=row_ok)
    else:
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s_sum = tl.zeros([BLOCK_R], tl.float32)
        for t0 in range(t_start, t_end, BLOCK_T):
            s, vis = _masked_logits(q, K, KVALID, b, hk, t0 + tl.arange(0, BLOCK_T), dd, qpos,
                                    skb, skh, skt, skd, svb, svh, svt, T, D, scale, HAS_KVALID, UPCAST)  # fmt: skip
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_sum = s_sum * tl.exp(m - safe) + tl.sum(tl.exp(s - safe[:, None]), 1)
            m = m_new
        tl.store(M_OUT + out, m, mask=row_ok)
        tl.store(L_OUT + out, s_sum, mask=row_ok)


@triton.jit
def _column_pass(
    Q, K, QPOS, KVALID, QVALID, LSE, COLSUM, COLSQ,
    sqb, sqh, sqr, sqd,
    skb, skh, skt, skd,
    spb, spr,
    svb, svh, svt,
    swb, swr,
    H, HK, R, T, D, scale,
    HAS_KVALID: tl.constexpr, HAS_QVALID: tl.constexpr, WITH_SQ: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // (H // HK)
    cols = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    dd = tl.arange(0, BLOCK_D)
    col_ok = cols < T
    k = tl.load(
        K + b * skb + hk * skh + cols[:, None] * skt + dd[None, :] * skd,
        mask=col_ok[:, None] & (dd[None, :] < D),
        other=0.0,
    )
    if HAS_KVALID:
        kv = tl.load(KVALID + b * svb + hk * svh + cols * svt, mask=col_ok, other=0) != 0
    else:
        kv = col_ok
    acc = tl.zeros([BLOCK_T], tl.float32)
    acc_sq = tl.zeros([BLOCK_T], tl.float32)
    t_first = pid_t * BLOCK_T
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        qpos = tl.load(QPOS + b * spb + rows * spr, mask=row_ok, other=-1)
        if tl.max(qpos) >= t_first:  # some row of this block sees this key block
            q = tl.load(
                Q + b * sqb + h * sqh + rows[:, None] * sqr + dd[None, :] * sqd,
                mask=row_ok[:, None] & (dd[None, :] < D),
                other=0.0,
            )
            lse = tl.load(LSE + pid_bh * R + rows, mask=row_ok, other=float("-inf"))
            s = _dot(q, tl.trans(k), UPCAST) * scale
            vis = (cols[None, :] <= qpos[:, None]) & kv[None, :] & row_ok[:, None] & (lse[:, None] > float("-inf"))
            p = tl.where(vis, tl.exp(s - tl.where(lse == float("-inf"), 0.0, lse)[:, None]), 0.0)
            if HAS_QVALID:
                qv = tl.load(QVALID + b * swb + rows * swr, mask=row_ok, other=0)
                p = tl.where(qv[:, None] != 0, p, 0.0)
            acc += tl.sum(p, 0)
            if WITH_SQ:
                acc_sq += tl.sum(p * p, 0)
    tl.store(COLSUM + pid_bh * T + cols, acc, mask=col_ok)
    if WITH_SQ:
        tl.store(COLSQ + pid_bh * T + cols, acc_sq, mask=col_ok)


def _config(D: int) -> dict:
    """Tile sizes. On a GPU, d = 128 tiles of 64 x 64. The CPU interpreter pays per operation, not per element, so
    there wide key tiles are quick (the slowest test shapes: 2x faster than the former 64 x 64 tiles at d = 64, 4x
    than 32 x 32 at d = 80-128), and rows in 32s still leave the tests' 40- and 63-row windows a ragged second row
    block."""
    block_d = max(16, triton.next_power_of_2(D))
    if INTERPRET:
        return dict(BLOCK_R=32, BLOCK_T=256, BLOCK_D=block_d)
    return dict(BLOCK_R=64, BLOCK_T=64, BLOCK_D=block_d, num_warps=4, num_stages=2)


def _splits(programs: int, t: int, block_t: int, device) -> int:
    """Key splits for the row pass: few rows (an observation window) would otherwise leave most of the GPU idle
    while each program sweeps every key; enough splits to give each SM a few programs."""
    if INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(4 * sms, max(programs, 1)), triton.cdiv(t, 8 * block_t)))


def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor,
    k_valid: torch.Tensor | None = None,
    q_valid: torch.Tensor | None = None,
    *,
    with_sq: bool = False,
    density_fraction: float | None = None,
    chunk: int | None = None,  # the reference's row tile; the kernel has its own blocks
    splits: int | None = None,  # key splits of the row pass (default: by GPU occupancy; tests force several)
    config: dict | None = None,  # tile / warp overrides, for tuning
) -> AttentionStats:
    B, H, R, D = q.shape
    _, HK, T, Dk = k.shape
    if Dk != D or H % HK or k.shape[0] != B:
        raise ValueError(
            f"attention_stats: q {tuple(q.shape)} and k {tuple(k.shape)} do not match (GQA needs H % Hk == 0)"
        )
    if q_pos.shape != (B, R):
        raise ValueError(f"attention_stats: q_pos must be [B, R] = {(B, R)}, got {tuple(q_pos.shape)}")
    dev = q.device
    q_pos = q_pos.to(device=dev, dtype=torch.int32).contiguous()
    kv = None
    if k_valid is not None:
        kv = (k_valid[:, None, :] if k_valid.ndim == 2 else k_valid).to(device=dev, dtype=torch.int8).contiguous()
    qv = q_valid.to(device=dev, dtype=torch.int8).contiguous() if q_valid is not None else None
    colsum = torch.empty(B, H, T, device=dev, dtype=torch.float32)
    colsq = torch.empty(B, H, T, device=dev, dtype=torch.float32) if with_sq else None
    cfg = dict(_config(D), **(config or {}))
    block_r, block_t = cfg["BLOCK_R"], cfg["BLOCK_T"]
    upcast = INTERPRET or q.dtype == torch.float32
    dummy = q_pos  # stands in for absent optional tensors (never read: the constexpr flags skip them)
    kv_strides = (kv.stride(0), kv.stride(1) if kv.shape[1] > 1 else 0, kv.stride(2)) if kv is not None else (0, 0, 0)
    row_blocks = triton.cdiv(R, block_r)
    S = splits or _splits(B * H * row_blocks, T, block_t, q.device)
    span = triton.cdiv(triton.cdiv(max(T, 1), S), block_t) * block_t  # keys per split, whole blocks
    common = (*q.stride(), *k.stride(), *q_pos.stride(), *kv_strides, H, HK, R, T, D, float(scale), span)
    lse = torch.full((B, H, R), float("-inf"), device=dev, dtype=torch.float32)
    density = None
    if R > 0:
        part_m = torch.empty(B * H, S, R, device=dev, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        grid = (B * H, row_blocks, S)
        _row_pass[grid](q, k, q_pos, kv if kv is not None else dummy, part_m, part_l, part_m, *common,
                        HAS_KVALID=kv is not None, COUNT=False, UPCAST=upcast, **cfg)  # fmt: skip
        m = part_m.amax(1)
        safe = torch.where(m == float("-inf"), 0.0, m)
        total = (part_l * torch.exp(part_m - safe[:, None])).sum(1)
        lse = torch.where(total > 0, safe + torch.log(total.clamp(min=1e-30)), float("-inf")).view(B, H, R)
        if density_fraction is not None:
            # a key counts when its probability is at least `fraction` of the row's largest: s >= max + log(fraction)
            threshold = (m + math.log(density_fraction)).contiguous()
            _row_pass[grid](q, k, q_pos, kv if kv is not None else dummy, part_m, part_l, threshold, *common,
                            HAS_KVALID=kv is not None, COUNT=True, UPCAST=upcast, **cfg)  # fmt: skip
            density = part_m.sum(1).view(B, H, R)
    elif density_fraction is not None:
        density = torch.zeros(B, H, 0, device=dev, dtype=torch.float32)
    if T > 0:
        _column_pass[(B * H, triton.cdiv(T, block_t))](
            q, k, q_pos, kv if kv is not None else dummy, qv if qv is not None else dummy, lse, colsum,
            colsq if colsq is not None else colsum,
            *q.stride(), *k.stride(), *q_pos.stride(), *kv_strides,
            *(qv.stride() if qv is not None else (0, 0)),
            H, HK, R, T, D, float(scale),
            HAS_KVALID=kv is not None, HAS_QVALID=qv is not None, WITH_SQ=with_sq, UPCAST=upcast, **cfg,
        )  # fmt: skip
    if density is not None and qv is not None:
        density *= qv[:, None, :]  # padding rows count nothing, as in the reference
    rows = qv.sum(-1).to(torch.float32) if qv is not None else torch.full((B,), float(R), device=dev)
    return AttentionStats(colsum, colsq, density, rows)
