"""Plain PyTorch references for vlcache's hot paths (clarity first, fp32 accumulation).

Every Triton kernel in this package has a function here with the same signature; tests compare the two, and the
dispatcher (`vlcache.kernels`) uses these wherever Triton or CUDA is missing.

Shapes: B batch, H query heads, Hk KV heads (H = g * Hk, query head h reads KV head h // g), R query rows,
T keys, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionStats:
    """Column statistics of softmax(q k^T * scale) over a set of query rows.

    - `colsum`: [B, H, T] sum over rows of the attention probabilities each key receives.
    - `colsq`: [B, H, T] sum over rows of squared probabilities (for the variance across rows), if asked.
    - `density`: [B, H, R] per row, the number of keys with probability >= fraction * row max, if asked.
    - `rows`: [B] number of query rows that counted (padding rows are skipped).
    """

    colsum: torch.Tensor
    colsq: torch.Tensor | None
    density: torch.Tensor | None
    rows: torch.Tensor

    def variance(self) -> torch.Tensor:
        """Unbiased variance across rows of each key's probability, [B, H, T] (CAKE's temporal shift)."""
        if self.colsq is None:
            raise ValueError("variance needs attention_stats(..., with_sq=True)")
        r = self.rows.to(self.colsum.dtype).view(-1, 1, 1)
        mean = self.colsum / r.clamp(min=1)
        return ((self.colsq - r * mean * mean) / (r - 1).clamp(min=1)).clamp(min=0)


def _grouped(q: torch.Tensor, hk: int) -> torch.Tensor:
    """[B, H, R, d] -> [B, Hk, g*R, d] so one matmul per KV head serves its whole query group (no repeat_kv copy)."""
    B, H, R, d = q.shape
    return q.reshape(B, hk, (H // hk) * R, d)


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, H, R, d] x [B, Hk, T, d] -> fp32 logits [B, H, R, T]."""
    B, H, R, _ = q.shape
    hk, T = k.shape[1], k.shape[2]
    s = torch.matmul(_grouped(q, hk).float(), k.float().transpose(-1, -2)) * scale
    return s.view(B, H, R, T)


def _mask(q_pos: torch.Tensor, T: int, k_valid: torch.Tensor | None, hk: int, H: int) -> torch.Tensor:
    """Visible keys [B, H or 1, R, T]: causal by slot (key j visible to row r iff j <= q_pos[r]) and not padding."""
    keys = torch.arange(T, device=q_pos.device)
    vis = keys.view(1, 1, 1, T) <= q_pos[:, None, :, None]  # [B, 1, R, T]
    if k_valid is not None:
        if k_valid.ndim == 2:
            vis = vis & k_valid[:, None, None, :]
        else:  # per KV head: expand to query heads
            vis = vis & k_valid.repeat_interleave(H // hk, dim=1)[:, :, None, :]
    return vis


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor,
    k_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of a few query rows over all keys, [B, H, R, T] fp32 (rows x keys, so only for
    small R: an observation window or the post-vision question).

    q: [B, H, R, d] post-RoPE queries. k: [B, Hk, T, d] post-RoPE keys. q_pos: [B, R] slot index of each row
    (causal: row r sees keys 0..q_pos[r]). k_valid: [B, T] or [B, Hk, T], False for padding keys.
    Rows that see no key at all (padding rows) come out as zeros.
    """
    s = _logits(q, k, scale)
    vis = _mask(q_pos, k.shape[2], k_valid, k.shape[1], q.shape[1])
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.nan_to_num(p, nan=0.0)


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
    chunk: int = 256,
) -> AttentionStats:
    """Column sums (and optionally squared sums and per-row density) of attention over query rows, computed in
    row tiles of `chunk`: peak extra memory is B*H*chunk*T floats, never R x T for all rows at once.

    Arguments as `attention_probs`, plus q_valid [B, R] (False rows are skipped) and:
    - with_sq: also sum the squared probabilities (variance across rows).
    - density_fraction: also count, per row, keys whose probability is >= fraction * the row's max (VL-Cache's
      ThresholdFilter, p = 0.01).
    """
    B, H, R, _ = q.shape
    T = k.shape[2]
    colsum = torch.zeros(B, H, T, dtype=torch.float32, device=q.device)
    colsq = torch.zeros_like(colsum) if with_sq else None
    density = torch.zeros(B, H, R, dtype=torch.float32, device=q.device) if density_fraction is not None else None
    for lo in range(0, R, chunk):
        hi = min(R, lo + chunk)
        p = attention_probs(q[:, :, lo:hi], k, scale, q_pos[:, lo:hi], k_valid)
        if q_valid is not None:
            p = p * q_valid[:, None, lo:hi, None]
        colsum += p.sum(2)
        if colsq is not None:
            colsq += (p * p).sum(2)
        if density is not None:
            rowmax = p.amax(-1, keepdim=True)
            density[:, :, lo:hi] = ((p >= density_fraction * rowmax) & (p > 0)).sum(-1).float()
    rows = q_valid.sum(-1) if q_valid is not None else torch.full((B,), R, device=q.device)
    return AttentionStats(colsum, colsq, density, rows)


def group_reduce(x: torch.Tensor, hk: int, agg: str = "mean") -> torch.Tensor:
    """[B, H, ...] per query head -> [B, Hk, ...] per KV head, aggregating each GQA group (mean, sum or max)."""
    B, H = x.shape[:2]
    g = x.view(B, hk, H // hk, *x.shape[2:])
    if agg == "mean":
        return g.mean(2)
    if agg == "sum":
        return g.sum(2)
    if agg == "max":
        return g.amax(2)
    raise ValueError(f"agg must be 'mean', 'sum' or 'max', got {agg!r}")


def pool1d(scores: torch.Tensor, kernel: int, kind: str = "avg") -> torch.Tensor:
    """Smooth scores along the last dim (SnapKV's clustering): same length out, `kernel` odd, zero padding for avg
    (as F.avg_pool1d with count_include_pad, which is what SnapKV uses)."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    pad = kernel // 2
    if kind == "avg":
        y = F.avg_pool1d(x, kernel, stride=1, padding=pad)
    elif kind == "max":
        y = F.max_pool1d(x, kernel, stride=1, padding=pad)
    else:
        raise ValueError(f"pooling must be 'avg' or 'max', got {kind!r}")
    return y.view(shape)


def gather_kv(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compaction: keep `index` [B, Hk, K] (sorted) of keys/values [B, Hk, T, d] -> [B, Hk, K, d] each."""
    idx = index[..., None]
    k = keys.gather(2, idx.expand(*index.shape, keys.shape[-1]))
    v = values.gather(2, idx.expand(*index.shape, values.shape[-1]))
    return k, v


def similarity_assign(
    keys: torch.Tensor, kept: torch.Tensor, *, chunk: int = 1024, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's most similar kept key by cosine, per KV head (LOOK-M's pivot assignment).

    keys [B, Hk, T, d]; kept [B, Hk, K] slot indices. Returns (assign [B, Hk, T] in [0, K), similarity [B, Hk, T]
    fp32). Ties go to the lower kept index. Tiled over slots: peak extra memory is B*Hk*chunk*K floats.
    """
    d = keys.shape[-1]
    kk = keys.gather(2, kept[..., None].expand(*kept.shape, d)).float()
    kk = kk / kk.norm(dim=-1, keepdim=True).clamp(min=eps)
    T = keys.shape[2]
    assign = torch.empty(keys.shape[:3], dtype=torch.long, device=keys.device)
    best = torch.empty(keys.shape[:3], dtype=torch.float32, device=keys.device)
    for lo in range(0, T, chunk):
        x = keys[:, :, lo : lo + chunk].float()
        x = x / x.norm(dim=-1, keepdim=True).clamp(min=eps)
        sim = x @ kk.transpose(-1, -2)  # [B, Hk, c, K]
        best[:, :, lo : lo + chunk], assign[:, :, lo : lo + chunk] = sim.max(-1)
    return assign, best


def position_assign(positions: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Each slot's nearest anchor by position (Elastic Cache), ties to the earlier anchor.

    positions [B, Hk, T]; anchors [B, Hk, A] anchor positions, ascending, A >= 1. Returns [B, Hk, T] in [0, A).
    """
    A = anchors.shape[-1]
    right = torch.searchsorted(anchors.contiguous(), positions.contiguous()).clamp(max=A - 1)
    left = (right - 1).clamp(min=0)
    d_left = (positions - anchors.gather(-1, left)).abs()
    d_right = (anchors.gather(-1, right) - positions).abs()
    return torch.where(d_left <= d_right, left, right)


def merge_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    kept: torch.Tensor,
    merged: torch.Tensor,
    assign: torch.Tensor,
    mode: str = "average",
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge evicted entries into the kept entry they are assigned to, for keys and values alike:

        x' = (x + sum_i src_i) / (n_x + 1)   with src_i = y_i (average), (y_i + x) / 2 (pivot), s_i * y_i (weighted)

    keys/values [B, Hk, T, d]; kept [B, Hk, K] slots; merged [B, Hk, T] bool, the slots to fold in (evicted ones);
    assign [B, Hk, T] in [0, K); weight [B, Hk, T] (s_i, for "weighted"). Computed in fp32; returns the K kept
    keys and values [B, Hk, K, d] in the input dtype.
    """
    if mode not in ("average", "pivot", "weighted"):
        raise ValueError(f"merge mode must be 'average', 'pivot' or 'weighted', got {mode!r}")
    out = []
    idx = assign[..., None]
    for x in (keys, values):
        d = x.shape[-1]
        base = x.gather(2, kept[..., None].expand(*kept.shape, d)).float()  # [B, Hk, K, d]
        y = x.float()
        if mode == "pivot":
            src = (y + base.gather(2, idx.expand(*assign.shape, d))) / 2
        elif mode == "weighted":
            src = y * weight[..., None].float()
        else:
            src = y
        src = src * merged[..., None]
        total = base.scatter_add(2, idx.expand(*assign.shape, d), src)
        count = torch.ones(kept.shape, dtype=torch.float32, device=x.device).scatter_add(2, assign, merged.float())
        out.append((total / count[..., None]).to(x.dtype))
    return out[0], out[1]


def quantized_attention(query: torch.Tensor, parts: list, scale: float) -> torch.Tensor:
    """Decode attention over a cache held in parts, some quantized (`vlcache.quant.KVPart`): every quantized part
    dequantized on the fly, then one softmax over all parts' slots (attention does not depend on slot order).

    query [B, H, R, d]; each part's keys / values [B, Hk, N, d] (a `Quantized` or a tensor) and `visible`
    [B, Hk, 1 or R, N] bool or None (every slot visible). Returns [B, H, R, d] in the query's dtype, computed in
    fp32; a row that sees no slot at all comes out as zeros.
    """
    from ..quant.tensor import Quantized, dequantize

    B, H, R, d = query.shape
    keys = [dequantize(p.keys) if isinstance(p.keys, Quantized) else p.keys.float() for p in parts]
    values = [dequantize(p.values) if isinstance(p.values, Quantized) else p.values.float() for p in parts]
    hk = keys[0].shape[1]
    g = H // hk
    mask = None
    if any(p.visible is not None for p in parts):
        rows = max(1 if p.visible is None else p.visible.shape[2] for p in parts)  # 1: the same for every row
        masks = [
            torch.ones(B, hk, rows, k.shape[2], dtype=torch.bool, device=k.device)
            if p.visible is None
            else p.visible.expand(B, hk, rows, k.shape[2])
            for p, k in zip(parts, keys)
        ]
        mask = torch.cat(masks, -1)  # [B, Hk, rows, T]
        if rows > 1:  # per query row: the same rows for every head of a GQA group
            mask = mask[:, :, None].expand(B, hk, g, rows, mask.shape[-1]).reshape(B, hk, g * rows, -1)
    k = torch.cat(keys, 2) if len(keys) > 1 else keys[0]
    v = torch.cat(values, 2) if len(values) > 1 else values[0]
    out = F.scaled_dot_product_attention(_grouped(query, hk).float(), k, v, attn_mask=mask, scale=scale)
    if mask is not None:  # a row that sees nothing: sdpa gives NaN
        out = out.nan_to_num(0.0)
    return out.view(B, H, R, d).to(query.dtype)


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    k_valid: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor | None = None,
    mass: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode attention of a few query rows per head over a per-KV-head cache, and each slot's attention mass.

    query [B, H, R, d]; keys [B, Hk, T, d]; values [B, Hk, T, dv]; k_valid [B, Hk, T], False at slots no row sees
    (padding, filler, unused room); q_pos [B, R] (optional) the slot of each row, which then sees slots <= it only.
    Returns out [B, H, R, dv] (query dtype) and mass [B, Hk, T] fp32: softmax(q k^T * scale) summed over the rows and
    averaged over each KV head's g query heads, i.e. `group_reduce(colsum, Hk, "mean")` of H2O's scores. A row that
    sees no slot gives zeros (no NaN). `mass=False`: the output alone (mass None).
    """
    B, H, R, _ = query.shape
    hk, T = keys.shape[1], keys.shape[2]
    g = H // hk
    s = _logits(query, keys, scale).view(B, hk, g, R, T)
    vis = k_valid.view(B, hk, 1, 1, T)
    if q_pos is not None:
        vis = vis & (torch.arange(T, device=keys.device).view(1, 1, 1, 1, T) <= q_pos.view(B, 1, 1, R, 1))
    s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    p = p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    out = torch.matmul(p.view(B, hk, g * R, T), values.float()).view(B, H, R, values.shape[-1])
    return out.to(query.dtype), p.sum(3).mean(2) if mass else None
