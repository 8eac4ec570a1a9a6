"""SnapKV (Li et al., NeurIPS 2024, arXiv 2404.14469): observation-window scoring with pooling."""

from dataclasses import dataclass

import torch

from .. import kernels
from .base import Policy
from .h2o import last_real
from .view import LayerView


@dataclass(kw_only=True)
class SnapKV(Policy):
    """Scores each prompt token by the attention it gets from the last `window` prompt rows, smoothed along the
    sequence so that neighbours of important tokens survive together; keeps the window plus the top scores.
    Prefill only: the cache then grows by one entry per generated token.

    - window (32): observation rows, also kept (at most the budget).
    - kernel (5): pooling width along the sequence; 1 turns pooling off.
    - pooling ("avg"): "avg" or "max".
    - agg ("mean"): how the query heads of a GQA group combine into their KV head's score.
    """

    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    agg: str = "mean"

    name = "snapkv"
    paper = "https://arxiv.org/abs/2404.14469"

    def __post_init__(self):
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {self.kernel}")
        if self.pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {self.pooling!r}")

    def always_keep(self, view: LayerView, total: torch.Tensor) -> torch.Tensor:
        return last_real(view.layout.valid, total.clamp(max=self.window))  # the window is at most the budget

    looks_ahead = True

    def score(self, view: LayerView) -> torch.Tensor:
        return self.ranked(view, self.observed(view)[0])

    def observed(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor]:
        # the window is the last query rows, which are the last slots (whole prompt or its recomputed tail)
        w = min(self.window, view.new)
        sums = view.probs(slice(view.new - w, None)).sum(2)  # [B, H, T]
        return sums, view.query_valid(slice(view.new - w, None)).sum(-1)

    def ranked(self, view: LayerView, sums: torch.Tensor) -> torch.Tensor:
        # pooled up to the window; the window (and any generated token after it) is kept anyway
        n = view.layout.length
        start = view.slots - min(self.window, view.new) if view.slots <= n else n - min(self.window, n)
        prefix = kernels.pool1d(sums[..., :start], self.kernel, self.pooling)
        s = torch.cat([prefix, torch.full_like(sums[..., start:], float("inf"))], dim=-1)
        return kernels.group_reduce(s, view.kv_heads, self.agg)
