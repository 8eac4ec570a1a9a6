"""VL-Cache (Tu et al., ICLR 2025, arXiv 2410.23317): sparsity-aware per-layer budgets, post-vision scoring."""

from dataclasses import dataclass

import torch

from .. import kernels
from .base import LayerView, Plan, Policy, Request
from .budget import apportion
from .h2o import last_real


@dataclass(kw_only=True)
class VLCache(Policy):
    """Scores tokens by the attention they get from the language rows after the last vision token (the question),
    and gives each layer a budget proportional to its attention density, measured on those same rows.

    Density of a layer = 1 - the share of causal (row, key) entries below `threshold` x the row's maximum. Budgets
    are set once every layer has seen the prompt (the full cache is held until then), clipped to
    [min_fraction, 1] of the prompt, and sum to the model-wide budget. Prefill only.

    - threshold (0.01): the ThresholdFilter's fraction of the row maximum.
    - recent (0.1): share of each layer's budget kept as the most recent tokens.
    - min_fraction (0.01): the smallest layer budget, as a fraction of the prompt.
    - max_queries (None): use at most this many post-vision rows (the paper's speed study used 50).
    - fallback_rows (32): rows used when the prompt ends on a vision token.
    - exact (True): integer budgets that add up exactly to the total (largest remainder); False floors each
      layer's clipped fraction as the paper does, losing what clipping and rounding drop.
    """

    threshold: float = 0.01
    recent: float = 0.1
    min_fraction: float = 0.01
    max_queries: int | None = None
    fallback_rows: int = 32
    exact: bool = True
    agg: str = "mean"
    chunk: int = 256

    name = "vlcache"
    paper = "https://arxiv.org/abs/2410.23317"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"recent must be in [0, 1], got {self.recent}")
        if not 0.0 < self.min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in (0, 1], got {self.min_fraction}")
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {self.max_queries}")

    def always_keep(self, view: LayerView, total: torch.Tensor) -> torch.Tensor:
        return last_real(view.layout.valid, torch.floor(self.recent * total.double()).long())

    def post_vision_rows(self, view: LayerView) -> tuple[int, torch.Tensor]:
        """(first query row, q_valid [B, rows from it]): the rows at positions after each prompt's last vision
        token; all rows for a prompt without vision; the last `fallback_rows` when nothing follows the vision."""
        layout = view.layout
        n = layout.length
        pad = (~layout.valid).long().cumprod(-1).sum(-1)
        has_vision = layout.vision.any(-1)
        start = torch.where(has_vision, layout.question_start, pad)
        start = torch.where(has_vision & (start >= n), torch.full_like(start, n - self.fallback_rows), start)
        if self.max_queries is not None:
            start = start.clamp(min=n - self.max_queries)
        start = start.clamp(min=0)
        pos = view.query_slots().to(start.device)  # [B, R] ascending
        chosen = pos >= start[:, None]
        r0 = int((~chosen).sum(-1).min())  # the first row any prompt uses
        return r0, chosen[:, r0:] & view.query_valid(slice(r0, None))

    def on_prefill(self, view: LayerView):
        r0, q_valid = self.post_vision_rows(view)
        rows = slice(r0, None)
        st = kernels.attention_stats(
            view.query[:, :, rows],
            view.keys,
            view.scale,
            view.query_slots(rows),
            view.key_valid(),
            q_valid,
            density_fraction=self.threshold,
            chunk=self.chunk,
        )
        # share of causal entries the threshold filters to zero, averaged over heads; each prompt its own
        causal = view.layout.valid.long().cumsum(-1)[:, r0:].float() * q_valid  # visible keys per row
        zero = ((causal[:, None, :] - st.density) * q_valid[:, None, :]).sum(-1)  # [B, H]
        sparsity = zero / causal.sum(-1, keepdim=True).clamp(min=1)
        view.slot_state["vlcache"] = kernels.group_reduce(st.colsum, view.kv_heads, self.agg)
        view.shared.setdefault("vlcache_density", {})[view.layer] = (1.0 - sparsity.mean(1)).tolist()  # [B]
        return None  # budgets need every layer's density: see after_prefill

    def cut_scores(self, view: LayerView) -> torch.Tensor:
        return view.slot_state["vlcache"]  # on_prefill's post-vision attention of this layer

    def layer_budgets(self, density: list[float], total: int, n: int) -> list[int]:
        """Per-layer budgets out of n candidates, `total` per layer on average, in proportion to density."""
        L = len(density)
        s = sum(density) or 1.0
        lo, hi = max(1.0, self.min_fraction * n), float(n)
        share = [min(max(d / s * total * L, lo), hi) for d in density]
        if self.exact:
            return apportion(total * L, share, [n] * L)
        return [max(1, int(x)) for x in share]

    def densities(self, request: Request) -> list[list[float]]:
        """Per prompt, the density of every layer."""
        by_layer = [request.shared["vlcache_density"][layer] for layer in request.layers]
        return [list(row) for row in zip(*by_layer)]

    def budgets(self, request: Request) -> dict[int, torch.Tensor]:
        """Each layer's budget [B] (the single-`budget` case)."""
        layout = request.view(request.layers[0]).layout
        total = self.total_budget(layout).tolist()
        n = layout.valid.sum(-1).tolist()
        per_row = [self.layer_budgets(d, t, m) for d, t, m in zip(self.densities(request), total, n)]
        dev = layout.valid.device
        return {layer: torch.tensor([row[i] for row in per_row], device=dev) for i, layer in enumerate(request.layers)}

    def after_prefill(self, request: Request):
        if self.budget is not None:
            budgets = self.budgets(request)
            plans = {layer: self.plan(request.view(layer), total=budgets[layer]) for layer in request.layers}
        else:  # per-modality amounts: each pool's model-wide total split by density, like the single budget
            base = self.plan(request.view(request.layers[0]))
            split = [
                [
                    self.layer_budgets(d, k, size)
                    for d, k, size in zip(self.densities(request), k.tolist(), mask.sum(-1).tolist())
                ]
                for mask, k in base.pools
            ]
            plans = {
                layer: Plan(
                    base.forced,
                    [
                        (mask, torch.tensor([row[i] for row in rows], device=mask.device))
                        for (mask, _), rows in zip(base.pools, split)
                    ],
                )
                for i, layer in enumerate(request.layers)
            }
        out = {}
        for layer, plan in plans.items():
            view = request.view(layer)
            out[layer] = self.select(view, plan, view.slot_state["vlcache"])
        return out
