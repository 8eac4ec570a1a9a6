"""Triton: decode attention that also returns each slot's attention mass (H2O's and CAKE's scores, no second pass).

Split over the keys (flash-decoding): grid (batch * KV head, key blocks). Each program takes all g * R query rows
of one KV head's group against BLOCK_T keys: it writes the block's logits and its partial softmax (row max, row sum,
unnormalised output). The partials are combined in PyTorch (a few small ops over [B, Hk, blocks, g * R]); a second
launch turns the stored logits into probabilities with the global row max and sum and sums them over the group's
rows into the mass. Keys are read once, the logits (g * R fp32 per slot, far fewer bytes than a key) twice.
Same signature as `reference.decode_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _partial_kernel(
    Q, K, V, VALID, QPOS, LOGITS, PM, PL, PACC,
    sqb, sqh, sqr, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    HK, R, GR, T, D, DV, NB, scale,
    HAS_QPOS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = pid_bh // HK
    h = pid_bh % HK
    rows = tl.arange(0, BLOCK_R)  # row i of the group: query head h * g + i // R, query row i % R
    row_ok = rows < GR
    qh = h * (GR // R) + rows // R
    qr = rows % R
    d = tl.arange(0, BLOCK_D)
    q = tl.load(
        Q + b * sqb + qh[:, None] * sqh + qr[:, None] * sqr + d[None, :] * sqd,
        mask=row_ok[:, None] & (d[None, :] < D),
        other=0.0,
    ).to(tl.float32)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    k = tl.load(
        K + b * skb + h * skh + t[:, None] * skt + d[None, :] * skd, mask=t_ok[:, None] & (d[None, :] < D), other=0.0
    ).to(tl.float32)
    # ieee: fp32 dots would otherwise run in TF32 on Ampere and later (10 mantissa bits), off from the reference
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_R, BLOCK_T]
    vis = tl.load(VALID + pid_bh * T + t, mask=t_ok, other=0) != 0
    see = row_ok[:, None] & vis[None, :]
    if HAS_QPOS:
        qp = tl.load(QPOS + b * R + qr, mask=row_ok, other=-1)
        see = see & (t[None, :] <= qp[:, None])
    s = tl.where(see, s, float("-inf"))
    tl.store(LOGITS + (pid_bh * BLOCK_R + rows[:, None]) * T + t[None, :], s, mask=row_ok[:, None] & t_ok[None, :])
    m = tl.max(s, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(s - m_safe[:, None])
    part = (pid_bh * NB + pid_t) * BLOCK_R + rows
    tl.store(PM + part, m)
    tl.store(PL + part, tl.sum(p, axis=1))
    dv = tl.arange(0, BLOCK_DV)
    v = tl.load(
        V + b * svb + h * svh + t[:, None] * svt + dv[None, :] * svd,
        mask=t_ok[:, None] & (dv[None, :] < DV),
        other=0.0,
    ).to(tl.float32)
    acc = tl.dot(p, v, input_precision="ieee")  # [BLOCK_R, BLOCK_DV]
    tl.store(PACC + part[:, None] * BLOCK_DV + dv[None, :], acc)


@triton.jit
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


def decode_attention(query, keys, values, k_valid, scale, q_pos=None):
    B, H, R, D = query.shape
    HK, T, DV = keys.shape[1], keys.shape[2], values.shape[-1]
    if keys.shape[0] != B or H % HK or k_valid.shape != (B, HK, T):
        raise ValueError(
            f"decode_attention: query {tuple(query.shape)}, keys {tuple(keys.shape)} and k_valid "
            f"{tuple(k_valid.shape)} do not fit ([B, H, R, d], [B, Hk, T, d], [B, Hk, T])"
        )
    GR = (H // HK) * R
    BLOCK_R = max(16, triton.next_power_of_2(GR))  # tl.dot wants 16 rows at least: the rest are masked
    BLOCK_T = 64
    BLOCK_DV = max(16, triton.next_power_of_2(DV))
    NB = triton.cdiv(T, BLOCK_T)
    dev = query.device
    valid = k_valid.to(torch.int8).contiguous()
    qpos = q_pos.to(torch.int32).contiguous() if q_pos is not None else valid
    logits = torch.empty(B * HK, BLOCK_R, T, device=dev, dtype=torch.float32)
    pm = torch.empty(B * HK, NB, BLOCK_R, device=dev, dtype=torch.float32)
    pl = torch.empty_like(pm)
    pacc = torch.empty(B * HK, NB, BLOCK_R, BLOCK_DV, device=dev, dtype=torch.float32)
    _partial_kernel[(B * HK, NB)](
        query, keys, values, valid, qpos, logits, pm, pl, pacc,
        *query.stride(), *keys.stride(), *values.stride(),
        HK, R, GR, T, D, DV, NB, float(scale),
        HAS_QPOS=q_pos is not None, BLOCK_R=BLOCK_R, BLOCK_T=BLOCK_T,
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_DV=BLOCK_DV,
    )  # fmt: skip
    # the blocks' partial softmaxes, combined (log-sum-exp); rows that see no slot keep m = 0 and l = 0
    m = pm.amax(1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(pm - m[:, None])  # a block that sees nothing has pm = -inf: weight 0
    denom = (w * pl).sum(1)
    inv_l = torch.where(denom > 0, 1.0 / denom.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(denom))
    out = (w[..., None] * pacc).sum(1) * inv_l[..., None]  # [B * Hk, BLOCK_R, BLOCK_DV]
    out = out[:, :GR, :DV].reshape(B, H, R, DV).to(query.dtype)
    mass = torch.empty(B, HK, T, device=dev, dtype=torch.float32)
    _mass_kernel[(B * HK, NB)](logits, m, inv_l, mass, GR, T, 1.0 / (H // HK), BLOCK_R=BLOCK_R, BLOCK_T=BLOCK_T)
    return out, mass
