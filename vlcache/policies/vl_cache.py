"""VL-Cache (Tu et al., ICLR 2025, arXiv 2410.23317): sparsity-aware per-layer budgets, post-vision scoring."""

from dataclasses import dataclass

import torch

from .. import kernels
from .base import Policy, cut_to_plans
from .budget import apportion
from .h2o import last_real
from .lookahead import hold_for_lookahead, lookahead_state
from .view import LayerStatistics, LayerView, Plan, Request


@dataclass(kw_only=True)
class VLCache(Policy):
    """Scores tokens by the attention they get from the language rows after the last vision token (the question),
    and gives each layer a budget proportional to its attention density, measured on those same rows.

    Density of a layer = 1 - the share of causal (row, key) entries below `threshold` x the row's maximum. Budgets
    are set once every layer has seen the prompt (the full cache is held until then), clipped to
    [min_fraction, 1] of the prompt, and sum to the model-wide budget. Prefill only.

    With `cascading` (CAKE's scheme applied to VL-Cache's densities), every layer is cut right after its prefill
    instead: the model-wide budget is split by density over the layers seen so far, and each of them is re-cut to
    its share. A share only shrinks as more layers arrive, so the cache never holds more than the model-wide
    budget plus the layer being computed, and the last cut uses the same densities and total as the paper's one.

    - threshold (0.01): the ThresholdFilter's fraction of the row maximum.
    - recent (0.1): share of each layer's budget kept as the most recent tokens.
    - min_fraction (0.01): the smallest layer budget, as a fraction of the prompt.
    - max_queries (None): use at most this many post-vision rows (the paper's speed study used 50).
    - fallback_rows (32): rows used when the prompt ends on a vision token.
    - exact (True): integer budgets that add up exactly to the total (largest remainder); False floors each
      layer's clipped fraction as the paper does, losing what clipping and rounding drop.
    - cascading (False): cut every layer as soon as it is seen (above); peak memory near SnapKV's, not the full
      cache's. The paper holds every layer whole until the last one's density is known.
    """

    threshold: float = 0.01
    recent: float = 0.1
    min_fraction: float = 0.01
    max_queries: int | None = None
    fallback_rows: int = 32
    exact: bool = True
    cascading: bool = False
    agg: str = "mean"
    chunk: int = 256

    name = "vlcache"
    paper = "https://arxiv.org/abs/2410.23317"
    looks_ahead = True

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
        if self.cascading and self.lookahead:
            raise ValueError("cascading cuts each layer during the prefill, lookahead after it: choose one")

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

    def measure(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        """(colsum [B, H, T]: the attention each slot gets from the post-vision rows, per query head; [B] how many
        rows those are; the layer's density per prompt)."""
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
        # visible keys per row, at the rows' own slots (image reuse recomputes a subset of the prompt's rows)
        cum = view.layout.valid.long().cumsum(-1).to(q_valid.device)
        at = view.query_slots(rows).to(cum.device).clamp(max=cum.shape[1] - 1)
        causal = cum.gather(1, at).float() * q_valid
        zero = ((causal[:, None, :] - st.density) * q_valid[:, None, :]).sum(-1)  # [B, H]
        sparsity = zero / causal.sum(-1, keepdim=True).clamp(min=1)
        return st.colsum, q_valid.sum(-1), (1.0 - sparsity.mean(1)).tolist()

    def score(self, view: LayerView) -> torch.Tensor:
        return kernels.group_reduce(self.measure(view)[0], view.kv_heads, self.agg)

    def on_prefill(self, view: LayerView):
        colsum, rows, density = self.measure(view)
        view.slot_state["vlcache"] = kernels.group_reduce(colsum, view.kv_heads, self.agg)
        if self.lookahead:  # the generated rows join these (lookahead_step)
            hold_for_lookahead(view, colsum, rows)
        view.shared.setdefault("vlcache_density", LayerStatistics()).by_layer[view.layer] = density  # [B]
        if self.cascading:
            return self.allocate(view.request, view.depth + 1)
        return None  # budgets need every layer's density: see after_prefill

    def cut_scores(self, view: LayerView) -> torch.Tensor:
        return view.slot_state["vlcache"]  # on_prefill's post-vision attention of this layer

    def layer_budgets(self, density: list[float], total: int, n: int, layers: int | None = None) -> list[int]:
        """Budgets of the layers with these densities, out of n candidates each, in proportion to density. They
        share `total` x `layers` (default: as many layers as densities; more while cascading, when the layers
        seen so far share the whole model's budget)."""
        seen = len(density)
        whole = total * (layers or seen)
        s = sum(density) or 1.0
        lo, hi = max(1.0, self.min_fraction * n), float(n)
        share = [min(max(d / s * whole, lo), hi) for d in density]
        if self.exact:
            return apportion(whole, share, [n] * seen)
        return [max(1, int(x)) for x in share]

    def densities(self, request: Request, seen: int | None = None) -> list[list[float]]:
        """Per prompt, the density of every layer (of the first `seen`)."""
        return request.shared["vlcache_density"].rows(request.layers[:seen])

    def observed(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor]:
        colsum, rows, _ = self.measure(view)
        return colsum, rows

    def ranked(self, view: LayerView, sums: torch.Tensor) -> torch.Tensor:
        return kernels.group_reduce(sums, view.kv_heads, self.agg)

    def after_prefill(self, request: Request):
        if self.lookahead:  # the shares are known now; each layer is cut when the generated rows have joined
            for layer, plan in self.plans(request, len(request.layers)).items():
                lookahead_state(request.view(layer)).plan = plan
            return None
        if self.cascading:
            return None  # the last layer's prefill made the final cut
        return self.allocate(request, len(request.layers))

    def allocate(self, request: Request, seen: int) -> dict:
        """Cut each of the first `seen` layers to its share of the model-wide budget (by density over them)."""
        return cut_to_plans(
            request,
            self.plans(request, seen),
            seen,
            lambda view, plan: self.select(view, plan, view.slot_state["vlcache"]),
        )

    def plans(
        self, request: Request, seen: int, policy: Policy | None = None, stats: LayerStatistics | None = None
    ) -> dict[int, Plan]:
        """The prompt-space budgets of the first `seen` layers: the model-wide budget split by density over them.
        `policy` (default: this one) gives the amounts and the tokens always kept, `stats` the densities (default:
        this method's own); a composed policy passes its own."""
        policy = policy or self
        layers, L = request.layers[:seen], len(request.layers)
        density = self.densities(request, seen) if stats is None else stats.rows(layers)
        first = request.view(request.layers[0])
        layout = first.layout
        if policy.budget is not None:
            totals = policy.total_budget(layout).tolist()
            n = layout.valid.sum(-1).tolist()
            per_row = [self.layer_budgets(d, t, m, L) for d, t, m in zip(density, totals, n)]
            dev = layout.valid.device
            plans = {
                layer: policy.plan(first, total=torch.tensor([row[i] for row in per_row], device=dev))
                for i, layer in enumerate(layers)
            }
        else:  # per-modality amounts: each pool's model-wide total split by density, like the single budget
            base = policy.plan(first)
            split = [
                [self.layer_budgets(d, k, size, L) for d, k, size in zip(density, k.tolist(), mask.sum(-1).tolist())]
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
                for i, layer in enumerate(layers)
            }
        return plans
