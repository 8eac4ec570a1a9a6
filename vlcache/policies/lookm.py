"""LOOK-M (Wan et al., EMNLP Findings 2024, arXiv 2406.18139): text-prior eviction plus merging."""

from dataclasses import dataclass

import torch

from .. import kernels
from .base import Policy
from .h2o import last_real
from .view import LayerView, Plan, Selection

MERGES = ("pivot", "average", "weighted", "none")


@dataclass(kw_only=True)
class LOOKM(Policy):
    """Ranks prompt tokens by accumulated attention (all prompt rows, tiled) with every text token lifted above
    every vision token (the "text prior": the row maximum is added to text scores), keeps the most recent ones
    and the top of that ranking, and merges each evicted entry into the kept entry whose key is most similar
    (cosine, per KV head) instead of dropping it. Keys are merged after RoPE, mixing rotary phases, as the paper
    does. Prefill only.

    - recent (0.5): share of the budget kept as the most recent tokens (the paper's 10% recent + 10% important).
    - merge ("pivot"): "pivot" x' = (x + sum (y_i + x)/2) / (n+1); "average" x' = (x + sum y_i) / (n+1);
      "weighted" x' = (x + sum s_i y_i) / (n+1) with s_i = cos(y_i, x); "none" drops them.
    - merge_filter (False): as the official code, merge only entries whose head-mean best similarity is at
      least the mean over all evicted entries.
    - official_compat (False): the official code's keep rule, which keeps every text token even beyond the
      budget (image positions still come from the modality map, not its hard-coded 576 tokens per image).
    """

    recent: float = 0.5
    merge: str = "pivot"
    merge_filter: bool = False
    official_compat: bool = False
    agg: str = "mean"
    chunk: int = 256

    name = "lookm"
    paper = "https://arxiv.org/abs/2406.18139"

    def __post_init__(self):
        super().__post_init__()
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"recent must be in [0, 1], got {self.recent}")

    def always_keep(self, view: LayerView, total: torch.Tensor) -> torch.Tensor:
        return last_real(view.layout.valid, torch.floor(self.recent * total.double()).long())

    def score(self, view: LayerView) -> torch.Tensor:
        s = view.stats(chunk=self.chunk).colsum  # [B, H, n]
        prior = s.amax(-1, keepdim=True)  # per head, the largest accumulated attention
        s = s + prior * view.layout.text[:, None, :]
        return kernels.group_reduce(s, view.kv_heads, self.agg)

    def plan(self, view: LayerView, **kw) -> Plan:
        plan = super().plan(view, **kw)
        if not self.official_compat:
            return plan
        # the official keep rule ("score >= 0") keeps all text; the important slots go to text first anyway
        text = view.layout.text
        added = text & ~plan.forced
        pools = [(mask & ~text, (k - (added & mask).sum(-1)).clamp(min=0)) for mask, k in plan.pools]
        return Plan(plan.forced | text, pools)

    def on_prefill(self, view: LayerView):
        sel = self.select(view, self.plan(view), self.score(view))
        if self.merge != "none":
            sel = self.merge_evicted(view, sel)
        return {view.layer: sel}

    def merge_evicted(self, view: LayerView, sel: Selection) -> Selection:
        kept = torch.zeros_like(view.slot_valid).scatter_(-1, sel.indices, True)
        evicted = view.slot_valid & ~kept
        if not bool(evicted.any()):
            return sel
        assign, sim = kernels.similarity_assign(view.keys, sel.indices)
        if self.merge_filter:
            per_slot = (sim * evicted).sum(1) / evicted.sum(1).clamp(min=1)  # head mean, [B, T]
            overall = (sim * evicted).sum() / evicted.sum()
            evicted = evicted & (per_slot >= overall)[:, None, :]
        keys, values = kernels.merge_kv(view.keys, view.values, sel.indices, evicted, assign, self.merge, sim)
        return Selection(sel.indices, keys, values)
