"""H2O, heavy-hitter oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048)."""

from dataclasses import dataclass

import torch

from .. import kernels
from .base import DecodeEvicting, LayerView


def last_real(valid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """[B, T] the last n[b] positions of each row (left padding: the real tokens end every row)."""
    T = valid.shape[-1]
    pos = torch.arange(T, device=valid.device)
    return valid & (pos[None, :] >= T - n[:, None])


@dataclass(kw_only=True)
class H2O(DecodeEvicting):
    """Keeps the tokens with the largest accumulated attention ("heavy hitters") plus the most recent ones.

    Prefill scores are attention column sums over every prompt row, computed in row tiles (no n x n matrix).
    While decoding, each new token's attention row is added to the scores and, once over budget, the
    non-recent entry with the lowest score is evicted (greedy, one per step), so the cache stays at budget.

    - recent (0.5): share of the budget kept as the most recent tokens (the paper's 10% + 10%).
    - agg ("mean"): how the query heads of a GQA group combine into their KV head's score.
    - chunk (256): query rows per tile when summing the prefill attention.
    - evict_every (1): see `DecodeEvicting`; the scores keep accumulating every step.
    """

    recent: float = 0.5
    agg: str = "mean"
    chunk: int = 256

    name = "h2o"
    order_free = True  # accumulated per slot, moved with it: evictions may fill holes in place
    paper = "https://arxiv.org/abs/2306.14048"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"recent must be in [0, 1], got {self.recent}")

    def _recent(self, total: torch.Tensor) -> torch.Tensor:
        return torch.floor(self.recent * total.double()).long()

    def always_keep(self, view: LayerView, total: torch.Tensor) -> torch.Tensor:
        return last_real(view.layout.valid, self._recent(total))

    def score(self, view: LayerView) -> torch.Tensor:
        return kernels.group_reduce(view.stats(chunk=self.chunk).colsum, view.kv_heads, self.agg)

    def on_prefill(self, view: LayerView):
        scores = self.score(view)
        plan = self.plan(view)
        view.slot_state["h2o"] = scores  # the cache gathers it with the kept slots
        view.state["budget"] = self.growth_budget(view, plan)
        view.state["recent"] = self._recent(self.total_budget(view.layout))
        return {view.layer: self.select(view, plan, scores)}

    def cut_scores(self, view: LayerView) -> torch.Tensor:
        return view.slot_state["h2o"]  # on_prefill's accumulated attention of this layer

    def on_append(self, view: LayerView):
        acc = view.slot_state["h2o"] + kernels.group_reduce(
            view.stats(chunk=self.chunk).colsum, view.kv_heads, self.agg
        )
        view.slot_state["h2o"] = acc
        if not self.eviction_due(view):
            return None
        # recent = the newest `recent` real tokens of each row, by position
        end = view.positions.amax(-1, keepdim=True) + 1  # [B, Hk, 1]
        recent = view.positions >= end - view.state["recent"].view(-1, 1, 1)
        forced = recent | view.prompt_mask(self.protected(view.layout))
        return self.keep_at_budget(view, view.state["budget"], acc, forced)
