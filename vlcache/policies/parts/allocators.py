"""Splits of the model-wide budget over layers: uniform, PyramidKV's, VL-Cache's density, CAKE's preference."""

from __future__ import annotations

import torch

from ... import kernels
from ..base import Policy
from ..cake import CAKE, cake_plan, cake_shares
from ..pyramidkv import PyramidKV, pyramid_plan
from ..view import LayerStatistics, LayerView, Plan, Request
from ..vl_cache import VLCache
from . import register_allocator
from .kinds import Allocator


@register_allocator("uniform")
class Uniform(Allocator):
    """Every layer the same budget."""


@register_allocator("pyramid")
class Pyramid(Allocator):
    """PyramidKV: budgets decreasing linearly with depth, the same total over the model (`beta`)."""

    uses = PyramidKV

    def layer_plan(self, policy: Policy, view: LayerView) -> Plan:
        return pyramid_plan(policy.plan(view), view.depth, view.num_layers, self.method.beta)


@register_allocator("density")
class Density(Allocator):
    """VL-Cache: each layer's share in proportion to its attention density on the post-vision rows."""

    uses = VLCache
    splits = True

    def measure(self, view: LayerView, scorer: Policy, observe: bool):
        colsum, rows, density = self.method.measure(view)
        if type(scorer) is not VLCache:
            return None, density
        return ((colsum, rows) if observe else kernels.group_reduce(colsum, view.kv_heads, scorer.agg)), density

    def plans(self, policy: Policy, request: Request, stats: LayerStatistics, seen: int) -> dict[int, Plan]:
        return self.method.plans(request, seen, policy=policy, stats=stats)


@register_allocator("preference")
class Preference(Allocator):
    """CAKE: each layer's share in proportion to its preference (entropy x variance of its window attention)."""

    uses = CAKE
    splits = True

    def measure(self, view: LayerView, scorer: Policy, observe: bool):
        preference, indicator = self.method.layer_statistics(view)
        return (indicator if type(scorer) is CAKE and not observe else None), preference

    def plans(self, policy: Policy, request: Request, stats: LayerStatistics, seen: int) -> dict[int, Plan]:
        layers = request.layers[:seen]
        view = request.view(request.layers[0])
        base = policy.plan(view).keep_whole(view.layout, self.whole_rows(policy, view.layout))
        shares = cake_shares(base, stats.rows(layers), len(request.layers))
        return {layer: cake_plan(base, shares, i) for i, layer in enumerate(layers)}

    def whole_rows(self, policy: Policy, layout) -> torch.Tensor:
        return self.method.fitting(layout, policy.total_budget(layout))
