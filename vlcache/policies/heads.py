"""Per-head budgets (Ada-KV, Feng et al., arXiv 2407.11550): a layer's budget moves between its KV heads.

A head whose scores are concentrated on a few tokens needs few of them; a head that spreads its attention needs
more. Ada-KV keeps, over all heads of a layer together, the entries with the highest scores, so each head's share
is how many of the layer's best entries it holds; a floor (its "safeguard") gives every head a part of the even
share first. Scores of different heads must be comparable: attention sums are (every row of every head sums to 1).
"""

from __future__ import annotations

import torch

from .budget import rank_desc

HEAD_BUDGETS = ("uniform", "adaptive")


def adaptive_head_budgets(scores: torch.Tensor, pool: torch.Tensor, k: torch.Tensor, floor: float) -> torch.Tensor:
    """[B, Hk] how many of `pool`'s slots each KV head keeps, summing to Hk x k per row.

    scores [B, Hk, T]; pool [B, Hk, T] the candidates (the same count in every head); k [B] or [B, Hk] the even
    share per head. Each head first takes its own best floor x k (rounded down), then the rest of the layer's
    budget goes to the best remaining entries of any head."""
    B, Hk, T = scores.shape
    k = k.view(B, -1).expand(B, Hk).long()
    s = torch.nan_to_num(scores.float(), nan=float("-inf")).masked_fill(~pool, float("-inf"))
    size = pool.sum(-1)  # [B, Hk]
    k = torch.minimum(k, size)
    base = torch.minimum(torch.floor(k.double() * floor).long(), size)  # the floor, per head
    taken = rank_desc(s) < base[..., None]  # each head's own best
    rest = s.masked_fill(taken | ~pool, float("-inf")).flatten(1)  # [B, Hk * T]
    left = (k.sum(-1) - base.sum(-1)).clamp(min=0)  # [B]
    won = (rank_desc(rest) < left[:, None]) & (rest > float("-inf"))
    return base + won.view(B, Hk, T).sum(-1)
