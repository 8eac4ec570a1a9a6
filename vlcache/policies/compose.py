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
- part_settings: settings of the parts, by name, e.g. {"window": 8, "beta": 10, "merge": "average"}; each goes to
  every part that has a setting of that name (a name no part has is refused).

Prefill only: after the prompt the cache grows by one entry per generated token. Per-head budgets
(`head_budgets`), `frame_min`, `prune_at` and the quantization settings apply as to any policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .. import kernels
from .base import (
    LayerStatistics,
    LayerView,
    Plan,
    Policy,
    Request,
    Selection,
    cut_to_plans,
    hold_for_lookahead,
    lookahead_state,
)
from .cake import CAKE, cake_allocate
from .elastic import ElasticCache
from .h2o import H2O
from .lookm import LOOKM
from .pyramidkv import PyramidKV, pyramid_plan
from .random import Random
from .snapkv import SnapKV
from .streaming import StreamingLLM
from .vl_cache import VLCache

SCORERS: dict[str, type[Policy]] = {
    "snapkv": SnapKV,
    "vlcache": VLCache,
    "h2o": H2O,
    "lookm": LOOKM,
    "cake": CAKE,
    "elastic": ElasticCache,
    "streamingllm": StreamingLLM,
    "random": Random,
}
ALLOCATORS: dict[str, type[Policy] | None] = {
    "uniform": None,
    "pyramid": PyramidKV,
    "density": VLCache,
    "preference": CAKE,
}
MERGERS: dict[str, type[Policy] | None] = {"none": None, "lookm": LOOKM, "elastic": ElasticCache}


def register_scorer(name: str):
    """Class decorator: a new scorer for compositions, as one file. The class is a `Policy` whose `score(view)`
    ranks the slots ([B, Hk, T], higher kept first) and whose `always_keep` (optional) names what it never evicts;
    `compose` then combines it with every allocator and merger:

        @register_scorer("mine")
        @dataclass(kw_only=True)
        class Mine(Policy):
            def score(self, view): ...

        Composed(vision_budget=0.05, scorer="mine", allocator="preference")
    """
    if name in SCORERS:
        raise ValueError(f"scorer {name!r} exists already; choose another name")

    def add(cls):
        if not (isinstance(cls, type) and issubclass(cls, Policy)) or cls.score is Policy.score:
            raise ValueError(f"a scorer is a Policy subclass with its own score(view); got {cls!r}")
        SCORERS[name] = cls
        return cls

    return add


_AMOUNTS = ("budget", "vision_budget", "text_budget", "protect")


@dataclass(kw_only=True)
class Composed(Policy):
    """Tokens ranked by one method's scores, the budget split over layers by another's rule, the evicted entries
    merged by a third's. See the module's docstring for the parts."""

    scorer: str = "vlcache"
    allocator: str = "uniform"
    merger: str = "none"
    cascading: bool = False
    part_settings: dict = field(default_factory=dict)

    name = "compose"

    @property
    def looks_ahead(self) -> bool:  # lookahead joins the scorer's rows: those of SnapKV and VL-Cache
        return self.scorer in ("snapkv", "vlcache")

    def __post_init__(self):
        super().__post_init__()
        for kind, value, known in (
            ("scorer", self.scorer, SCORERS),
            ("allocator", self.allocator, ALLOCATORS),
            ("merger", self.merger, MERGERS),
        ):
            if value not in known:
                raise ValueError(f"{kind}={value!r} not understood; choose from {', '.join(known)}")
        if self.cascading and self.allocator not in ("density", "preference"):
            raise ValueError(
                "cascading re-cuts layers as the split over layers changes: allocator density or preference"
            )
        if self.cascading and self.merger != "none":
            raise ValueError("cascading cuts a layer several times, and merging each time would merge merged entries")
        if self.lookahead and (self.cascading or self.merger != "none"):
            raise ValueError("lookahead cuts each layer once, after the prefill: without cascading or a merger")
        if not isinstance(self.part_settings, dict):
            raise ValueError(f"part_settings must be a dict of setting names to values, got {self.part_settings!r}")
        amounts = {k: getattr(self, k) for k in _AMOUNTS}
        classes = [SCORERS[self.scorer], ALLOCATORS[self.allocator], MERGERS[self.merger]]
        taken = {f.name for c in classes if c is not None for f in fields(c)} - {f.name for f in fields(Policy)}
        unknown = sorted(set(self.part_settings) - taken)
        if unknown:
            raise ValueError(f"no part of this composition has the setting {', '.join(map(repr, unknown))}")

        def part(cls):
            own = {f.name for f in fields(cls)}
            return cls(**amounts, **{k: v for k, v in self.part_settings.items() if k in own})

        self._scorer = part(SCORERS[self.scorer])
        self._allocator = None if ALLOCATORS[self.allocator] is None else part(ALLOCATORS[self.allocator])
        self._merger = None if MERGERS[self.merger] is None else part(MERGERS[self.merger])

    # ------------------------------------------------------------------ parts

    def always_keep(self, view: LayerView, total: torch.Tensor) -> torch.Tensor | None:
        return self._scorer.always_keep(view, total)

    def score(self, view: LayerView) -> torch.Tensor:
        if isinstance(self._scorer, CAKE):
            return self._scorer.layer_statistics(view)[1]
        return self._scorer.score(view)

    def _prefill_passes(self, view: LayerView, observe: bool = False):
        """(the scorer's scores [B, Hk, T], or with `observe` its (sums, rows) for lookahead; the allocator's
        statistic of this layer per prompt, None for uniform and pyramid). A scorer and an allocator of one method
        (VL-Cache's scores and densities, CAKE's indicator and preference) take their settings from the same
        `part_settings`, so one attention pass gives both."""
        one = type(self._allocator) is type(self._scorer)
        if one and isinstance(self._scorer, VLCache):
            colsum, rows, density = self._scorer.measure(view)
            first = (colsum, rows) if observe else kernels.group_reduce(colsum, view.kv_heads, self._scorer.agg)
            return first, density
        if one and isinstance(self._scorer, CAKE):  # CAKE does not look ahead
            preference, indicator = self._scorer.layer_statistics(view)
            return indicator, preference
        first = self._scorer.observed(view) if observe else self.score(view)
        if isinstance(self._allocator, VLCache):
            return first, self._allocator.measure(view)[2]
        if isinstance(self._allocator, CAKE):
            return first, self._allocator.layer_statistics(view)[0]
        return first, None

    def _layer_plan(self, view: LayerView) -> Plan:
        """This layer's prompt-space budget where it is known from the layer alone (uniform, pyramid)."""
        plan = self.plan(view)
        if self.allocator == "pyramid":
            plan = pyramid_plan(plan, view.depth, view.num_layers, self._allocator.beta)
        return plan

    def _merge(self, view: LayerView, sel: Selection, plan: Plan) -> Selection:
        if isinstance(self._merger, LOOKM):
            return self._merger.merge_evicted(view, sel)
        if isinstance(self._merger, ElasticCache):
            # anchors are the kept slots outside the forced ones; one layer cut once, so slots are prompt positions
            return self._merger.merge_into_anchors(
                view, sel, plan.forced if plan.forced.ndim == 2 else plan.forced[:, 0]
            )
        return sel

    def _cut(self, view: LayerView, plan: Plan, scores: torch.Tensor) -> Selection:
        sel = self.select(view, plan, scores)
        return self._merge(view, sel, plan) if self._merger is not None else sel

    def observed(self, view: LayerView):
        return self._scorer.observed(view)

    def ranked(self, view: LayerView, sums: torch.Tensor) -> torch.Tensor:
        return self._scorer.ranked(view, sums)

    def lookahead_plan(self, view: LayerView) -> Plan:
        plan = lookahead_state(view).plan  # a layer-splitting allocator's share, set after the prefill
        return self._layer_plan(view) if plan is None else plan

    # ------------------------------------------------------------------ hooks

    def on_prefill(self, view: LayerView):
        first, statistic = self._prefill_passes(view, observe=bool(self.lookahead))
        if statistic is not None:
            view.shared.setdefault("compose", LayerStatistics()).by_layer[view.layer] = statistic
        if self.lookahead:  # keep the prompt whole and the scorer's rows for the generated ones to join
            hold_for_lookahead(view, *first)
            return None
        if statistic is None:  # uniform, pyramid: the layer's budget is known now
            return {view.layer: self._cut(view, self._layer_plan(view), first)}
        view.slot_state["compose"] = first  # moved with the slots by every cut
        if self.cascading:
            return self.allocate(view.request, view.depth + 1)
        return None

    def cut_scores(self, view: LayerView) -> torch.Tensor:
        return view.slot_state["compose"] if "compose" in view.slot_state else self.score(view)

    def after_prefill(self, request: Request):
        if self.allocator in ("uniform", "pyramid") or self.cascading:
            return None
        if self.lookahead:  # the shares are known now; each layer is cut when the generated rows have joined
            for layer, plan in self.plans(request, len(request.layers)).items():
                lookahead_state(request.view(layer)).plan = plan
            return None
        return self.allocate(request, len(request.layers))

    def plans(self, request: Request, seen: int) -> dict[int, Plan]:
        """Prompt-space budgets of the first `seen` layers, the model-wide total split by the allocator."""
        stats = request.shared["compose"]
        if isinstance(self._allocator, VLCache):
            request.shared["vlcache_density"] = stats  # where VL-Cache's split reads its densities
            return self._allocator.plans(request, seen, policy=self)
        layers, L = request.layers[:seen], len(request.layers)
        prefs = stats.rows(layers)
        base = self.plan(request.view(request.layers[0]))
        shares = [
            [cake_allocate(L * int(kb), p, int(sb)) for p, kb, sb in zip(prefs, k.tolist(), mask.sum(-1).tolist())]
            for mask, k in base.pools
        ]
        return {
            layer: Plan(
                base.forced,
                [
                    (mask, torch.tensor([row[i] for row in share], device=mask.device))
                    for (mask, _), share in zip(base.pools, shares)
                ],
            )
            for i, layer in enumerate(layers)
        }

    def allocate(self, request: Request, seen: int) -> dict:
        """Cut each of the first `seen` layers to its share (skipping those already within it while cascading)."""
        return cut_to_plans(
            request,
            self.plans(request, seen),
            seen,
            lambda view, plan: self._cut(view, plan, view.slot_state["compose"]),
        )
