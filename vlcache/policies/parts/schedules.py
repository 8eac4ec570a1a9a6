"""When layers are cut: once after the prompt, or also while decoding as H2O, StreamingLLM, CAKE and Elastic Cache
do (each holds a layer at the size its prefill cut left, evicting by its own rule every `evict_every` tokens)."""

from __future__ import annotations

import torch

from ..base import Policy
from ..cake import CAKE
from ..elastic import ElasticCache
from ..h2o import H2O
from ..streaming import StreamingLLM
from ..view import LayerView, Plan, Selection
from . import register_schedule
from .kinds import Schedule


@register_schedule("prefill")
class Prefill(Schedule):
    """One cut after the prompt; every generated token is kept."""


class _Holding(Schedule):
    """A published method's decode-time eviction: its `start_decoding` after the prefill cut, its `on_append`."""

    evicts = True

    def start(self, policy: Policy, view: LayerView, plan: Plan, sel: Selection | None) -> None:
        self.method.start_decoding(view, plan)

    def leave_whole(self, view: LayerView, rows: torch.Tensor) -> None:
        self.method.layer_state(view).leave_whole(rows)

    def on_append(self, policy: Policy, view: LayerView):
        return self.method.on_append(view)


@register_schedule("h2o")
class HeavyHitters(_Holding):
    """H2O: every step's attention accumulates per slot; the lowest-scoring non-recent entry leaves."""

    uses = H2O

    def observe(self, view: LayerView) -> torch.Tensor:
        return self.method.observe(view)  # the prompt rows' sums, which decoding adds to


@register_schedule("streamingllm")
class Recency(_Holding):
    """StreamingLLM: the oldest entry after the sinks leaves."""

    uses = StreamingLLM


@register_schedule("cake")
class WindowAttention(_Holding):
    """CAKE: the entry the newest token attends to least (pooled, the recent window kept) leaves."""

    uses = CAKE


@register_schedule("elastic")
class FixedPoint(_Holding):
    """Elastic Cache: the entry at a fixed point after the prompt leaves, keeping the kept fraction of those seen."""

    uses = ElasticCache

    def start(self, policy: Policy, view: LayerView, plan: Plan, sel: Selection | None) -> None:
        if sel is None:  # left as it is by a cascading cut: every slot it holds counts as kept
            B, Hk, T = view.slot_valid.shape
            sel = Selection(torch.arange(T, device=view.keys.device).expand(B, Hk, T))
        self.method.start_decoding(view, sel)
