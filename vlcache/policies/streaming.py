"""StreamingLLM (Xiao et al., ICLR 2024, arXiv 2309.17453): attention sinks plus a recent window."""

from dataclasses import dataclass

import torch

from .base import DecodeEvicting
from .h2o import HeldState
from .view import LayerView, Plan


def first_real(valid: torch.Tensor, n: int) -> torch.Tensor:
    """[B, T] the first n real (non-padding) positions of each row."""
    return valid & (valid.long().cumsum(-1) <= n)


@dataclass(kw_only=True)
class StreamingLLM(DecodeEvicting):
    """Keeps the first `sinks` tokens and the most recent ones up to the budget, needing no attention scores.

    While decoding the cache stays at that size: as each token arrives the oldest non-sink entry leaves (of the
    text, under per-modality amounts: see hold.py).
    Keys keep their original positions (the paper's pos-shift re-rotation is for streams past the trained
    context, which VLM prompts are not).

    - sinks (4): leading tokens that are never evicted.
    - evict_every (1): see `DecodeEvicting`.
    """

    sinks: int = 4

    name = "streamingllm"
    State = HeldState
    order_free = True  # scores are by position: evictions may fill holes in place
    paper = "https://arxiv.org/abs/2309.17453"

    def __post_init__(self):
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {self.sinks}")

    def score(self, view: LayerView) -> torch.Tensor:
        return view.positions.float()  # the most recent first

    def always_keep(self, view: LayerView, total: torch.Tensor) -> torch.Tensor:
        return first_real(view.layout.valid, self.sinks)

    def start_decoding(self, view: LayerView, plan: Plan) -> None:
        """Hold the layer at what its cut leaves (`plan`, the prompt-space budget it was cut to: the hold counts the
        layer itself)."""
        self.layer_state(view).budget = self.growth_budget()

    def on_prefill(self, view: LayerView):
        plan = self.plan(view)
        self.start_decoding(view, plan)
        return {view.layer: self.select(view, plan, self.score(view))}

    def on_append(self, view: LayerView):
        budget = self.layer_state(view).budget
        if budget is None or not budget.evicts or not self.eviction_due(view):  # (None: the prompt left whole)
            return None
        forced = view.prompt_mask(self.protected(view.layout) | first_real(view.layout.valid, self.sinks))
        return self.keep_at_budget(view, self.layer_state(view).budget, self.score(view), forced)
