"""Budget amounts (a ratio of tokens, float in (0, 1], or an absolute token count, int >= 1), their split over
layers, and the ranking that picks the best candidates within one (`select_indices`: forced slots plus each pool's
top-k, per KV head)."""

from __future__ import annotations

import math

import torch

Amount = float | int


def check_amount(name: str, value, *, allow_none: bool = True):
    """Validate a budget amount, raising ValueError that names the valid range."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} is required: a ratio in (0, 1] or a token count >= 1")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a ratio in (0, 1] (float) or a token count >= 1 (int), got {value!r}")
    if isinstance(value, float):
        if not (0.0 < value <= 1.0) or math.isnan(value):
            raise ValueError(
                f"{name}={value} is out of range: a ratio must be in (0, 1] (use an int for a token count)"
            )
    elif value < 1:
        raise ValueError(f"{name}={value} is out of range: a token count must be >= 1")
    return value


def resolve(amount: Amount, n: torch.Tensor) -> torch.Tensor:
    """Tokens to keep out of n (per row, [B] long): max(1, floor(ratio * n)) or min(count, n); 0 when n == 0."""
    n = n.long()
    if isinstance(amount, float):
        k = torch.floor(amount * n.double()).long().clamp(min=1)
    else:
        k = torch.full_like(n, int(amount))
    return torch.minimum(k, n)


def apportion(total: int, weights: list[float], caps: list[int] | None = None) -> list[int]:
    """Split `total` into integers proportional to `weights`, each at most its cap, summing exactly to
    min(total, sum(caps)) (largest remainder; ties to the lower index). What cannot go to a capped entry is
    spread over the others in proportion to their weights."""
    m = len(weights)
    caps = list(caps) if caps is not None else [total] * m
    total = min(total, sum(caps))
    out = [0] * m
    free = [i for i in range(m) if caps[i] > 0]
    left = total
    while left > 0 and free:
        w = [max(weights[i], 0.0) for i in free]
        ws = sum(w)
        share = [left * x / ws for x in w] if ws > 0 else [left / len(free)] * len(free)
        give = [min(int(math.floor(s)), caps[i] - out[i]) for s, i in zip(share, free)]
        rem = left - sum(give)
        order = sorted(range(len(free)), key=lambda j: (-(share[j] - math.floor(share[j])), j))
        for j in order:
            if rem == 0:
                break
            if give[j] < caps[free[j]] - out[free[j]]:
                give[j] += 1
                rem -= 1
        for j, i in enumerate(free):
            out[i] += give[j]
        left = total - sum(out)
        free = [i for i in free if out[i] < caps[i]]
    return out


def rank_desc(scores: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim, 0 = highest score; ties go to the lower position (stable)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank


def pool_rank(scores: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """[B, Hk, T] float64 rank of each slot among `pool`'s by `scores` (0 = best; NaN last); meaningless outside."""
    s = torch.nan_to_num(scores.float(), nan=float("-inf")).masked_fill(~pool, float("-inf"))
    return rank_desc(s).double()


def per_head(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T] -> [B, Hk, T] (a view); [B, Hk, T] is returned as is."""
    return mask[:, None, :].expand(mask.shape[0], heads, mask.shape[-1]) if mask.ndim == 2 else mask


def select_indices(
    scores: torch.Tensor,
    forced: torch.Tensor,
    pools: list[tuple[torch.Tensor, torch.Tensor]],
    slot_valid: torch.Tensor,
    with_filler: bool = False,
):
    """Kept slots [B, Hk, K], ascending: the forced slots plus the top-k of each pool by score, per KV head.

    scores [B, Hk, T]; forced and pool masks [B, T] or [B, Hk, T]; k [B] or [B, Hk]; slot_valid [B, Hk, T]. Rows of a
    batch may keep different numbers of real tokens; every row then holds K = the largest count, the shorter rows
    filling up with their padding slots, then with slots they did not choose. With `with_filler`, also returns
    the [B, Hk, K] mask of those filler slots (kept only for shape, to be masked out).
    """
    B, Hk, T = scores.shape
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    keep = per_head(forced, Hk).clone()
    for mask, k in pools:
        m = per_head(mask, Hk)
        rank = rank_desc(s.masked_fill(~m, float("-inf")))
        keep |= m & (rank < k.view(B, -1, 1))
    counts = keep.sum(-1)  # [B, Hk], equal across heads of a row
    K = int(counts.max()) if counts.numel() else 0
    if K == T:
        idx = torch.arange(T, device=scores.device).expand(B, Hk, T).contiguous()
    else:
        # order: kept, then padding, then the rest by score; the first K of that order survive
        group = torch.where(keep, 0, torch.where(slot_valid, 2, 1))
        key = group * (T + 1) + rank_desc(s)
        idx = torch.topk(key, K, dim=-1, largest=False).indices.sort(dim=-1).values
    if not with_filler:
        return idx
    filler = ~keep.gather(-1, idx) & slot_valid.gather(-1, idx)
    return idx, None, None, (filler if bool(filler.any()) else None)
