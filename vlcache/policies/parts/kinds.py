"""The contracts of the allocator, merger and schedule parts (scorers are `Policy` subclasses with `score`).

Each part is built once per composition with `method`: an instance of the published method whose code it runs
(`uses`), made with the composition's amounts and those of its settings that method has; None for parts that need
no method (uniform, none, prefill).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..base import Policy
from ..view import LayerStatistics, LayerView, Plan, Request, Selection


class Part:
    uses: ClassVar[type[Policy] | None] = None  # the published method whose settings and code the part takes
    name: ClassVar[str] = ""  # set by its register_* decorator

    def __init__(self, method: Policy | None = None):
        self.method = method


class Allocator(Part):
    """Splits the model-wide budget over layers. Per-layer rules (`splits` False) give each layer its plan from
    the layer alone; layer-splitting rules measure a statistic in every layer and split once they have all (or,
    while cascading, among the layers seen so far)."""

    splits: ClassVar[bool] = False

    def layer_plan(self, policy: Policy, view: LayerView) -> Plan:
        """A per-layer rule's prompt-space budget for `view`'s layer; `policy` gives the amounts and forced tokens."""
        return policy.plan(view)

    def measure(self, view: LayerView, scorer: Policy, observe: bool) -> tuple[object | None, list[float]]:
        """A layer-splitting rule: (the scorer's scores, or with `observe` its lookahead (sums, rows), when this
        part's method is the scorer's and one attention pass gives both, else None; this layer's statistic per
        prompt)."""
        raise NotImplementedError

    def plans(self, policy: Policy, request: Request, stats: LayerStatistics, seen: int) -> dict[int, Plan]:
        """A layer-splitting rule: the prompt-space budgets of the first `seen` layers from their statistics."""
        raise NotImplementedError

    def whole_rows(self, policy: Policy, layout) -> torch.Tensor | None:
        """[B] (bool) the prompts this rule leaves uncompressed (CAKE leaves one that fits its budget plus its
        window), each as it would alone; None: none."""
        return None

    def leaves_whole(self, policy: Policy, view: LayerView) -> bool:
        """Whether every prompt of the batch is left uncompressed (then nothing is cut)."""
        rows = self.whole_rows(policy, view.layout)
        return rows is not None and bool(rows.all())


class Merger(Part):
    """Folds the entries a cut evicts into those it keeps (or drops them: the base)."""

    def merge(self, policy: Policy, view: LayerView, sel: Selection, plan: Plan) -> Selection:
        return sel


class Schedule(Part):
    """When a layer is cut. The base cuts once, after the prompt (the cache then grows by one entry per generated
    token); `evicts` schedules hold each layer at the size the prefill left while decoding."""

    evicts: ClassVar[bool] = False

    def observe(self, view: LayerView) -> torch.Tensor | None:
        """At a layer's prefill, before any cut: record what the schedule needs from the prompt's rows (kept
        aligned with the slots, in `view.slot_state`). Returns its method's prefill scores where it has them, for
        a scorer of the same method to reuse (one attention pass, not two)."""
        return None

    def start(self, policy: Policy, view: LayerView, plan: Plan, sel: Selection | None) -> None:
        """The layer's final prefill cut: `plan` the prompt-space budget it was cut to, `sel` what it kept."""

    def leave_whole(self, view: LayerView, rows: torch.Tensor) -> None:
        """Never evict from the prompts `rows` [B] (bool) of `view`'s layer: the allocator left them whole."""

    def on_append(self, policy: Policy, view: LayerView) -> dict | None:
        """After a decode step's attention: selections or evictions, or None (`policy.keep_at_budget` does the
        common part: keep the forced slots and the best-scoring others down to a size)."""
        return None
