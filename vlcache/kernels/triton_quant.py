"""Triton: decode attention over quantized KV, dequantized in registers (the codes are read once, never expanded in
memory). Same signature as `reference.quantized_attention`.

Each quantized part is one launch; grid (batch * query head, query row); a program streams the part's slots in
blocks: unpack each slot's codes (a byte holds 8 / bits of them), scale and shift them by their group's scale and
zero point, q . k, an online softmax, and the same for the values. It writes the part's partial output and its
log-sum-exp; parts in full precision (the recent window, 16-bit modalities) and parts whose visibility differs per
query row (the new rows' causal triangle) take the PyTorch partial below, and the partials are combined by their
log-sum-exp (as split-K flash decoding does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.tensor import Quantized, dequantize


@triton.jit
def _quant_attention_kernel(
    Q, KC, KS, KZ, KG, VC, VS, VZ, VG, VALID, OUT, LSE,
    H, HK, R, N, D, NGK, NGV, scale,
    BITS: tl.constexpr, G: tl.constexpr, V_CHANNEL: tl.constexpr, HAS_KG: tl.constexpr, HAS_VG: tl.constexpr,
    HAS_VALID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    r = tl.program_id(1)
    b = pid // H
    h = pid % H
    bk = b * HK + h // (H // HK)
    PER: tl.constexpr = 8 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    DP = D // PER
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    byte = d // PER
    shift = (d % PER) * BITS
    q = tl.load(Q + (pid * R + r) * D + d, mask=dm, other=0.0).to(tl.float32) * scale
    # one-element blocks, not Python scalars: loop-carried values keep one type when compiled
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nm = n < N
        ok = nm
        if HAS_VALID:
            ok = ok & (tl.load(VALID + bk * N + n, mask=nm, other=0) != 0)
        m2 = nm[:, None] & dm[None, :]
        codes = tl.load(KC + (bk * N + n)[:, None] * DP + byte[None, :], mask=m2, other=0).to(tl.int32)
        kq = ((codes >> shift[None, :]) & MASK).to(tl.float32)
        if HAS_KG:
            gk = tl.load(KG + bk * N + n, mask=nm, other=0).to(tl.int32)
        else:
            gk = n // G
        ks = tl.load(KS + (bk * NGK + gk)[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        kz = tl.load(KZ + (bk * NGK + gk)[:, None] * D + d[None, :], mask=m2, other=0.0).to(tl.float32)
        s = tl.sum((kq * ks + kz) * q[None, :], axis=1)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        codes = tl.load(VC + (bk * N + n)[:, None] * DP + byte[None, :], mask=m2, other=0).to(tl.int32)
        vq = ((codes >> shift[None, :]) & MASK).to(tl.float32)
        if V_CHANNEL:
            if HAS_VG:
                gv = tl.load(VG + bk * N + n, mask=nm, other=0).to(tl.int32)
            else:
                gv = n // G
            off = (bk * NGV + gv)[:, None] * D + d[None, :]
        else:
            off = (bk * N + n)[:, None] * (D // G) + (d // G)[None, :]
        vs = tl.load(VS + off, mask=m2, other=0.0).to(tl.float32)
        vz = tl.load(VZ + off, mask=m2, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * (vq * vs + vz), axis=0)
        m_i = m_new
    denom = tl.where(l_i > 0, l_i, 1.0)
    tl.store(OUT + (pid * R + r) * D + d, acc / denom, mask=dm)
    one = tl.arange(0, 1)
    tl.store(LSE + pid * R + r + one, tl.where(l_i > 0, m_i + tl.log(denom), float("-inf")))


def segment_attention(
    query: torch.Tensor,
    keys: Quantized,
    values: Quantized,
    valid: torch.Tensor | None,
    scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One quantized part: (out [B, H, R, d] fp32, lse [B, H, R] fp32; -inf and zeros for a row that sees no slot).
    valid [B, Hk, N] bool or None. `out` / `lse` may be given (tests pass them filled with NaN)."""
    B, H, R, D = query.shape
    HK, N = keys.codes.shape[1], keys.codes.shape[2]
    if keys.axis != "channel" or values.bits != keys.bits or values.group != keys.group or keys.dim != D:
        raise ValueError("segment_attention: keys per channel, values of the same bits and group, head dims equal")
    if H % HK:
        raise ValueError(f"segment_attention: {H} query heads do not group over {HK} KV heads")
    out = torch.empty(B, H, R, D, device=query.device, dtype=torch.float32) if out is None else out
    lse = torch.empty(B, H, R, device=query.device, dtype=torch.float32) if lse is None else lse
    if B * H * R == 0:
        return out, lse
    dummy = keys.codes  # stands in for absent optional tensors (never read: the flags are off)
    v_channel = values.axis == "channel"
    _quant_attention_kernel[(B * H, R)](
        query.contiguous(), keys.codes.contiguous(), keys.scale.contiguous(), keys.zero.contiguous(),
        dummy if keys.index is None else keys.index.contiguous(),
        values.codes.contiguous(), values.scale.contiguous(), values.zero.contiguous(),
        dummy if values.index is None else values.index.contiguous(),
        dummy if valid is None else valid.to(torch.int8).contiguous(), out, lse,
        H, HK, R, N, D, keys.scale.shape[2], values.scale.shape[2] if v_channel else 1, float(scale),
        BITS=keys.bits, G=keys.group, V_CHANNEL=v_channel, HAS_KG=keys.index is not None,
        HAS_VG=v_channel and values.index is not None, HAS_VALID=valid is not None,
        BLOCK_N=64, BLOCK_D=max(16, triton.next_power_of_2(D)),
    )  # fmt: skip
    return out, lse


def dense_partial(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None, scale):
    """A full-precision part in PyTorch: (out [B, H, R, d] fp32, lse [B, H, R] fp32), like `segment_attention`."""
    B, H, R, D = query.shape
    HK, N = keys.shape[1], keys.shape[2]
    g = H // HK
    s = torch.matmul(query.reshape(B, HK, g * R, D).float(), keys.float().transpose(-1, -2)) * scale
    if visible is not None:
        vis = visible.expand(B, HK, R, N)[:, :, None].expand(B, HK, g, R, N).reshape(B, HK, g * R, N)
        s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [B, HK, g*R]
    p = torch.exp(s - lse.nan_to_num(0.0, neginf=0.0)[..., None]).nan_to_num(0.0)
    out = torch.matmul(p, values.float())
    return out.view(B, H, R, D), lse.view(B, H, R)


def quantized_attention(query: torch.Tensor, parts: list, scale: float) -> torch.Tensor:
    outs, lses = [], []
    for part in parts:
        if part.slots == 0:
            continue
        quantized = isinstance(part.keys, Quantized)
        if quantized and (part.visible is None or part.visible.shape[2] == 1) and part.keys.axis == "channel":
            valid = None if part.visible is None else part.visible[:, :, 0]
            o, s = segment_attention(query, part.keys, part.values, valid, scale)
        else:
            k = dequantize(part.keys) if quantized else part.keys
            v = dequantize(part.values) if isinstance(part.values, Quantized) else part.values
            o, s = dense_partial(query, k, v, part.visible, scale)
        outs.append(o)
        lses.append(s)
    if not outs:
        return torch.zeros_like(query)
    lse = torch.stack(lses)  # [P, B, H, R]
    top = torch.logsumexp(lse, dim=0)
    w = torch.exp(lse - top.nan_to_num(0.0, neginf=0.0)).nan_to_num(0.0)  # each part's share of the softmax mass
    return (w[..., None] * torch.stack(outs)).sum(0).to(query.dtype)
