"""PyramidKV (Cai et al., arXiv 2406.02069): SnapKV scoring with budgets that shrink layer by layer."""

from dataclasses import dataclass

import torch

from .budget import apportion
from .snapkv import SnapKV
from .view import LayerView, Plan


def pyramid(k: int, size: int, layers: int, beta: float) -> list[int]:
    """Per-layer budgets decreasing linearly from layer 0, summing to layers * k, each at most `size`.
    min = k / beta and max = 2k - min; if max would pass the pool size, max = size and min = 2k - max."""
    k = min(k, size)
    if layers == 1 or k == 0:
        return [k] * layers
    lo = k / beta
    hi = 2 * k - lo
    if hi >= size:
        hi, lo = size, 2 * k - size
    step = (hi - lo) / (layers - 1)
    return apportion(k * layers, [hi - i * step for i in range(layers)], [size] * layers)


@dataclass(kw_only=True)
class PyramidKV(SnapKV):
    """SnapKV's scores, but lower layers (which attend broadly) keep more and upper layers fewer, linearly, with
    the same total over the model. Settings as SnapKV, plus:

    - beta (20): the top layer keeps 1/beta of the average budget (before capping).
    """

    beta: float = 20.0

    name = "pyramidkv"
    paper = "https://arxiv.org/abs/2406.02069"

    def __post_init__(self):
        super().__post_init__()
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")

    def plan(self, view: LayerView, *, total: torch.Tensor | None = None, weight: float = 1.0) -> Plan:
        return pyramid_plan(super().plan(view, total=total, weight=weight), view.depth, view.num_layers, self.beta)


def pyramid_plan(plan: Plan, depth: int, layers: int, beta: float) -> Plan:
    """A layer's plan with each pool's k replaced by the pyramid's share for this depth."""
    pools = []
    for mask, k in plan.pools:
        size = mask.sum(-1)
        k_l = [pyramid(int(kb), int(sb), layers, beta)[depth] for kb, sb in zip(k.tolist(), size.tolist())]
        pools.append((mask, torch.tensor(k_l, dtype=torch.long, device=k.device)))
    return Plan(plan.forced, pools)
