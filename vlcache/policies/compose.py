"""A policy combined from the published methods' parts: whose scores, whose split over layers, whose merging.

    Composed(vision_budget=0.03, scorer="vlcache", allocator="preference", merger="lookm")
    --policy compose --set scorer=vlcache --set allocator=preference --set merger=lookm   (the command line)
    "compose:scorer=vlcache;allocator=preference;merger=lookm"                           (benchmark specs)

- scorer: whose prefill scores rank the tokens (and which tokens it always keeps: SnapKV's window, VL-Cache's
  recent share, H2O's recent share, StreamingLLM's sinks, Elastic Cache's first tokens):
  snapkv, vlcache (post-vision rows), h2o (all rows), lookm (all rows, text first), cake (window mean + variance),
  elastic (all rows, one choice for every head), streamingllm (position), random.
- allocator: how the model-wide budget is split over layers: uniform (each layer the same), pyramid (PyramidKV's
  linear decrease), density (VL-Cache's attention density), preference (CAKE's entropy x variance). density and
  preference hold every layer whole until all have been seen, unless `cascading` cuts each as it comes (the
  layers seen so far share the model-wide budget; see VLCache.cascading).
- merger: what happens to the evicted entries: none (dropped), lookm (merged into the most similar kept key),
  elastic (merged into the nearest kept anchor by position).
- schedule: when layers are cut: prefill (once, after the prompt; the cache then grows by one entry per generated
  token), or also while decoding, holding each layer at the size its prefill cut left: h2o (accumulated attention,
  recent share kept), streamingllm (the oldest after the sinks leaves), cake (the entry the newest token attends to
  least), elastic (the entry at a fixed point leaves); every `evict_every` tokens.
- part_settings: settings of the parts, by name, e.g. {"window": 8, "beta": 10, "merge": "average"}; each goes to
  every part that has a setting of that name (a name no part has is refused).

The parts and their registries are in policies/parts/ (a new part is one registered class, in one file); every
published method written as its parts is in policies/presets.py. Per-head budgets (`head_budgets`), `frame_min`,
`prune_at` and the quantization settings apply as to any policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .base import Policy, cut_to_plans
from .lookahead import hold_for_lookahead, lookahead_state
from .parts import ALLOCATORS, MERGERS, SCHEDULES, SCORERS, register_scorer
from .view import LayerStatistics, LayerView, Plan, Request, Selection

__all__ = ["ALLOCATORS", "MERGERS", "SCHEDULES", "SCORERS", "Composed", "ComposedRequest", "register_scorer"]

_AMOUNTS = ("budget", "vision_budget", "text_budget", "protect")


@dataclass
class ComposedRequest:
    """What a composition knows of the whole request: the allocator's statistic of every layer seen, and whether
    the allocator left the prompt whole."""

    statistics: LayerStatistics = field(default_factory=LayerStatistics)
    whole: bool = False


@dataclass(kw_only=True)
class Composed(Policy):
    """Tokens ranked by one method's scores, the budget split over layers by another's rule, the evicted entries
    merged by a third's, cut on a fourth's schedule. See the module's docstring for the parts."""

    scorer: str = "vlcache"
    allocator: str = "uniform"
    merger: str = "none"
    schedule: str = "prefill"
    cascading: bool = False
    part_settings: dict = field(default_factory=dict)

    name = "compose"

    @property
    def looks_ahead(self) -> bool:  # lookahead joins the scorer's rows: those of SnapKV and VL-Cache
        return bool(getattr(SCORERS.get(self.scorer), "looks_ahead", False))

    @property
    def decodes(self) -> bool:
        return self._schedule.evicts

    @property
    def evict_every(self) -> int:  # the schedule's, for compiled decode's batching of evictions
        return getattr(self._schedule.method, "evict_every", 1)

    def appended_since_eviction(self, state: dict) -> int:
        method = self._schedule.method
        return method.appended_since_eviction(state) if method is not None else 0

    def evicts_in(self, state: dict) -> bool:
        return self._schedule.evicts and self._schedule.method.evicts_in(state)

    @property
    def decode_mass(self) -> bool:  # the schedule's method reads the mass compiled decode hands over (H2O, CAKE)
        return bool(getattr(self._schedule.method, "decode_mass", False))

    def __post_init__(self):
        super().__post_init__()
        for kind, value, known in (
            ("scorer", self.scorer, SCORERS),
            ("allocator", self.allocator, ALLOCATORS),
            ("merger", self.merger, MERGERS),
            ("schedule", self.schedule, SCHEDULES),
        ):
            if value not in known:
                raise ValueError(f"{kind}={value!r} not understood; choose from {', '.join(known)}")
        splits = ALLOCATORS[self.allocator].splits
        if self.cascading and not splits:
            names = " or ".join(n for n, a in ALLOCATORS.items() if a.splits)
            raise ValueError(f"cascading re-cuts layers as the split over layers changes: allocator {names}")
        if self.cascading and self.merger != "none":
            raise ValueError("cascading cuts a layer several times, and merging each time would merge merged entries")
        if self.lookahead and (self.cascading or self.merger != "none" or self.schedule != "prefill"):
            raise ValueError(
                "lookahead cuts each layer once, after the prefill: without cascading, a merger or a decode schedule"
            )
        if not isinstance(self.part_settings, dict):
            raise ValueError(f"part_settings must be a dict of setting names to values, got {self.part_settings!r}")
        parts = [ALLOCATORS[self.allocator], MERGERS[self.merger], SCHEDULES[self.schedule]]
        classes = [SCORERS[self.scorer]] + [p.uses for p in parts if p.uses is not None]
        taken = {f.name for c in classes for f in fields(c)} - {f.name for f in fields(Policy)}
        unknown = sorted(set(self.part_settings) - taken)
        if unknown:
            raise ValueError(f"no part of this composition has the setting {', '.join(map(repr, unknown))}")
        amounts = {k: getattr(self, k) for k in _AMOUNTS}

        def method(cls):
            own = {f.name for f in fields(cls)}
            return cls(**amounts, **{k: v for k, v in self.part_settings.items() if k in own})

        self._scorer = method(SCORERS[self.scorer])
        self._allocator, self._merger, self._schedule = (p(None if p.uses is None else method(p.uses)) for p in parts)

    # ------------------------------------------------------------------ parts

    def always_keep(self, view: LayerView, total: torch.Tensor) -> torch.Tensor | None:
        return self._scorer.always_keep(view, total)

    def score(self, view: LayerView) -> torch.Tensor:
        return self._scorer.score(view)

    def plan(self, view: LayerView, *, total: torch.Tensor | None = None, weight: float = 1.0) -> Plan:
        # the scorer's: the same amounts and forced tokens, and its own rule where it has one (LOOK-M's
        # official_compat keeps all text)
        return self._scorer.plan(view, total=total, weight=weight)

    def request_state(self, shared: dict) -> ComposedRequest:
        state = shared.get("compose")
        if state is None:
            state = shared["compose"] = ComposedRequest()
        return state

    def _prefill_passes(self, view: LayerView, observe: bool = False):
        """(the scorer's scores [B, Hk, T], or with `observe` its (sums, rows) for lookahead; the allocator's
        statistic of this layer per prompt, None for per-layer rules). A part of the scorer's own method (VL-Cache's
        densities, CAKE's preferences, H2O's decode-time sums) gives the scores from the same attention pass."""
        first, statistic = None, None
        if self._allocator.splits:
            first, statistic = self._allocator.measure(view, self._scorer, observe)
        scheduled = self._schedule.observe(view)
        if first is None and scheduled is not None and type(self._schedule.method) is type(self._scorer):
            first = scheduled
        if first is None:
            first = self._scorer.observed(view) if observe else self.score(view)
        return first, statistic

    def _cut(self, view: LayerView, plan: Plan, scores: torch.Tensor) -> Selection:
        """Select by `scores` within `plan` (slot space), merge what it evicts."""
        return self._merger.merge(self, view, self.select(view, plan, scores), plan)

    def observed(self, view: LayerView):
        return self._scorer.observed(view)

    def ranked(self, view: LayerView, sums: torch.Tensor) -> torch.Tensor:
        return self._scorer.ranked(view, sums)

    def lookahead_plan(self, view: LayerView) -> Plan:
        plan = lookahead_state(view).plan  # a layer-splitting allocator's share, set after the prefill
        return self._allocator.layer_plan(self, view) if plan is None else plan

    # ------------------------------------------------------------------ hooks

    def on_prefill(self, view: LayerView):
        request = self.request_state(view.shared)
        if request.whole or self._allocator.leaves_whole(self, view):
            request.whole = True
            if self.lookahead:  # nothing waits for generated rows: the layer is left as it is
                lookahead_state(view).done = True
            return None
        first, statistic = self._prefill_passes(view, observe=bool(self.lookahead))
        if statistic is not None:
            request.statistics.by_layer[view.layer] = statistic
        if self.lookahead:  # keep the prompt whole and the scorer's rows for the generated ones to join
            hold_for_lookahead(view, *first)
            return None
        if statistic is None:  # a per-layer rule: the layer's budget is known now
            plan = self._allocator.layer_plan(self, view)
            sel = self._cut(view, plan, first)
            self._start(view, plan, sel)
            return {view.layer: sel}
        view.slot_state["compose"] = first  # moved with the slots by every cut
        if self.cascading:
            return self.allocate(view.request, view.depth + 1)
        return None

    def cut_scores(self, view: LayerView) -> torch.Tensor | None:
        if self.request_state(view.shared).whole:
            return None
        return view.slot_state["compose"] if "compose" in view.slot_state else self.score(view)

    def after_prefill(self, request: Request):
        state = self.request_state(request.shared)
        if not self._allocator.splits or self.cascading or state.whole:
            return None
        if self.lookahead:  # the shares are known now; each layer is cut when the generated rows have joined
            for layer, plan in self.plans(request, len(request.layers)).items():
                lookahead_state(request.view(layer)).plan = plan
            return None
        return self.allocate(request, len(request.layers))

    def on_append(self, view: LayerView):
        return self._schedule.on_append(self, view)

    def _start(self, view: LayerView, plan: Plan, sel: Selection | None) -> None:
        """The schedule takes over the layer after its cut; a prompt the allocator left whole in a batch is never
        evicted from while decoding, as it is alone (where the whole request is left)."""
        self._schedule.start(self, view, plan, sel)
        rows = self._allocator.whole_rows(self, view.layout)
        if self._schedule.evicts and rows is not None and bool(rows.any()):
            self._schedule.leave_whole(view, rows)

    def plans(self, request: Request, seen: int) -> dict[int, Plan]:
        """Prompt-space budgets of the first `seen` layers, the model-wide total split by the allocator."""
        return self._allocator.plans(self, request, self.request_state(request.shared).statistics, seen)

    def allocate(self, request: Request, seen: int) -> dict:
        """Cut each of the first `seen` layers to its share (skipping those already within it while cascading);
        the schedule starts from each layer's share."""
        plans = self.plans(request, seen)
        out = cut_to_plans(request, plans, seen, lambda view, plan: self._cut(view, plan, view.slot_state["compose"]))
        for layer, plan in plans.items():
            self._start(request.view(layer), plan, out.get(layer))
        return out
