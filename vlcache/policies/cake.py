"""CAKE (Qin et al., ICLR 2025, arXiv 2503.12491): layer preferences, cascading budgets, mean + variance eviction."""

from dataclasses import dataclass, field

import torch

from .. import kernels
from .base import DecodeEvicting
from .h2o import last_real
from .hold import Hold, hold_of
from .view import EvictionState, LayerStatistics, LayerView, Plan, Request


def cake_allocate(total: int, prefs: list[float], cap: int) -> list[int]:
    """Split `total` over layers in proportion to their preferences: floor each share, cap at `cap`, spread what
    the caps cut evenly over the uncapped layers (remainder to the lowest indices), then add or take away evenly
    so the sum is exactly `total` (as far as [1, cap] allows). CAKE's adjust_budgets, with the capping repeated
    until it holds."""
    m = len(prefs)
    s = sum(prefs)
    budgets = [int(p / s * total) for p in prefs] if s > 0 else [total // m] * m
    while True:
        excess = sum(max(0, b - cap) for b in budgets)
        budgets = [min(b, cap) for b in budgets]
        free = [i for i, b in enumerate(budgets) if b < cap]
        if excess == 0 or not free:
            break
        per, rem = divmod(excess, len(free))
        for j, i in enumerate(free):
            budgets[i] += per + (j < rem)
    target = min(total, cap * m)
    floor = 1 if target >= m else 0
    while (diff := target - sum(budgets)) != 0:
        movable = [i for i in range(m) if (budgets[i] < cap if diff > 0 else budgets[i] > floor)]
        if not movable:
            break
        per, rem = divmod(abs(diff), len(movable))
        for j, i in enumerate(movable):
            step = per + (j < rem)
            budgets[i] += min(step, cap - budgets[i]) if diff > 0 else -min(step, budgets[i] - floor)
    return budgets


def cake_shares(plan: Plan, prefs: list[list[float]], layers: int) -> list[list[list[int]]]:
    """Per pool of the prompt-space `plan`, per prompt: the model-wide total (`layers` x the pool's k) split over
    the layers whose preferences `prefs` (per prompt, per layer) are given, each capped at the pool's size."""
    return [
        [
            cake_allocate(layers * int(kb), list(p), int(sb))
            for p, kb, sb in zip(prefs, k.tolist(), mask.sum(-1).tolist())
        ]
        for mask, k in plan.pools
    ]


def cake_plan(plan: Plan, shares: list[list[list[int]]], i: int) -> Plan:
    """The prompt-space plan of the i-th layer seen: `plan`'s forced tokens, each pool's k its share."""
    return Plan(
        plan.forced,
        [
            (mask, torch.tensor([row[i] for row in share], device=mask.device))
            for (mask, _), share in zip(plan.pools, shares)
        ],
    )


@dataclass
class CakeLayer(EvictionState):
    """A CAKE layer while decoding: held at `hold` (in all or per modality), the newest `window` [B] entries ranked
    first and always kept."""

    hold: Hold | None = None
    window: torch.Tensor | None = None

    @property
    def evicts(self) -> bool:
        return self.hold is not None and self.hold.evicts

    def leave_whole(self, rows: torch.Tensor) -> None:
        if self.hold is not None:
            self.hold = self.hold.never_in(rows)


@dataclass
class CakeRequest:
    """What CAKE knows of the whole request: every layer's preference, the prompt-space plan (the same for every
    layer), and whether the prompt fits the budget whole (then CAKE leaves it)."""

    preference: LayerStatistics = field(default_factory=LayerStatistics)
    plan: Plan | None = None
    skip: bool = False


@dataclass(kw_only=True)
class CAKE(DecodeEvicting):
    """Each layer gets a share of the model-wide budget in proportion to its preference, the product of how
    spread its observation-window attention is (entropy) and how much it shifts across the window's rows
    (variance), measured per prompt. Inside a layer, tokens are ranked by mean + gamma x variance of their window
    attention, avg-pooled.

    `budget` is the average per-layer cache size S (window included); the model keeps L x (S - window) outside the
    windows. With `cascading` (default), after each layer's prefill every layer seen so far is re-cut to its
    share among the layers seen so far, so the cache never holds more than that total (plus the windows and the
    layer being computed) during prefill. While decoding each layer stays at its size (per modality under
    per-modality amounts: hold.py): as a token arrives, the entry the new token attends to least (pooled, window
    excluded) leaves.

    - window (32), gamma (200), kernel (5): the observation window, the variance weight, the pooling width.
    - tau1, tau2 (1.0, 1.0): preference = entropy^(1/tau1) * variance^(1/tau2) (the code tunes them per model).
    - cascading (True): False cuts every layer once, after the last one (the whole cache is held until then).
    - evict_every (1): see `DecodeEvicting`; then the entries leaving are those the latest token attends to least.
    """

    window: int = 32
    gamma: float = 200.0
    tau1: float = 1.0
    tau2: float = 1.0
    kernel: int = 5
    cascading: bool = True
    agg: str = "mean"

    name = "cake"
    State = CakeLayer
    paper = "https://arxiv.org/abs/2503.12491"

    def __post_init__(self):
        super().__post_init__()
        if self.window < 2:
            raise ValueError(f"window must be >= 2 (a variance needs two rows), got {self.window}")
        if self.tau1 <= 0 or self.tau2 <= 0:
            raise ValueError(f"tau1 and tau2 must be > 0, got {self.tau1}, {self.tau2}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {self.kernel}")

    def always_keep(self, view: LayerView, total: torch.Tensor) -> torch.Tensor:
        return last_real(view.layout.valid, total.clamp(max=self.window))

    def score(self, view: LayerView) -> torch.Tensor:
        return self.layer_statistics(view)[1]

    @property
    def decode_mass(self) -> bool:
        """Compiled decode may hand over the latest row's attention mass (the GQA group's mean: `agg="mean"` only)
        instead of `on_append` computing it again (hf/compiled_decode.py)."""
        return self.agg == "mean"

    def fits(self, layout, total: torch.Tensor) -> bool:
        """Whether every prompt fits the budget `total` [B] plus the window: CAKE then leaves it whole."""
        return bool(self.fitting(layout, total).all())

    def fitting(self, layout, total: torch.Tensor) -> torch.Tensor:
        """[B] the prompts that fit the budget `total` [B] plus the window (each left whole, in a batch too)."""
        return layout.valid.sum(-1) <= total + self.window

    def plan(self, view: LayerView, **kw) -> Plan:
        """The prompt-space plan; a prompt of a batch that fits whole is kept whole, as it would be alone."""
        plan = super().plan(view, **kw)
        return plan.keep_whole(view.layout, self.fitting(view.layout, self.total_budget(view.layout)))

    def start_decoding(self, view: LayerView, plan: Plan) -> None:
        """Hold the layer at what its cut leaves while decoding (`plan`: the prompt-space budget it was cut to; the
        hold counts the layer itself), the newest `window` kept."""
        state = self.layer_state(view)
        total = self.total_budget(view.layout)
        # a prompt that fits whole is never evicted from, in a batch as alone (where CAKE leaves it untouched)
        state.hold = hold_of(self, grow=False).never_in(self.fitting(view.layout, total))
        state.window = total.clamp(max=self.window)  # per row: a short prompt's beside a long one's as alone

    def layer_statistics(self, view: LayerView) -> tuple[list[float], torch.Tensor]:
        """(preference per prompt, indicator [B, Hk, n]) from the last `window` prompt rows."""
        T, w = view.slots, min(self.window, view.new)  # the window: the last query rows, the last slots
        A = view.probs(slice(view.new - w, None))  # [B, H, w, T]
        prefix = A[..., : T - w]
        entropy = -(prefix * torch.log(prefix + 1e-10)).sum((1, 2, 3))  # [B]
        shift = prefix.var(dim=2).sum((1, 2)) if w > 1 else torch.zeros_like(entropy)
        preference = (entropy.clamp(min=0) ** (1 / self.tau1) * shift ** (1 / self.tau2)).tolist()
        indicator = A.mean(2) + self.gamma * (A.var(dim=2) if w > 1 else torch.zeros_like(A[:, :, 0]))
        pooled = kernels.pool1d(indicator[..., : T - w], self.kernel, "avg")
        indicator = torch.cat([pooled, torch.full_like(indicator[..., T - w :], float("inf"))], dim=-1)
        return preference, kernels.group_reduce(indicator, view.kv_heads, self.agg)

    @staticmethod
    def request_state(shared: dict) -> CakeRequest:
        state = shared.get("cake")
        if state is None:
            state = shared["cake"] = CakeRequest()
        return state

    def on_prefill(self, view: LayerView):
        request = self.request_state(view.shared)
        if self.fits(view.layout, self.total_budget(view.layout)):
            request.skip = True  # the prompt fits: CAKE leaves it whole
            return None
        preference, indicator = self.layer_statistics(view)
        view.slot_state["cake"] = indicator  # compacted along with the layer, for later re-cuts
        request.preference.by_layer[view.layer] = preference
        request.plan = self.plan(view)  # prompt-space; the same for every layer
        if self.cascading:
            return self.allocate(view.request, view.depth + 1)
        return None

    def cut_scores(self, view: LayerView) -> torch.Tensor | None:
        return view.slot_state.get("cake")  # None when the prompt fits (CAKE leaves it whole)

    def after_prefill(self, request: Request):
        if self.cascading or self.request_state(request.shared).skip:
            return None
        return self.allocate(request, len(request.layers))

    def allocate(self, request: Request, seen: int):
        """Cut each of the first `seen` layers to its share of the model-wide budget."""
        layers = request.layers[:seen]
        state = self.request_state(request.shared)
        prefs = state.preference.rows(layers)  # per prompt, per layer
        plan = state.plan
        L = len(request.layers)
        shares = cake_shares(plan, prefs, L)  # per pool and prompt: the model-wide total over the layers seen
        out = {}
        for i, layer in enumerate(layers):
            view = request.view(layer)
            mine = cake_plan(plan, shares, i)
            self.start_decoding(view, mine)
            if bool((view.slot_valid[:, 0].sum(-1) > mine.kept()).any()):  # (a prompt that fits keeps all)
                out[layer] = self.select(view, mine.to_slots(view), view.slot_state["cake"])
        return out

    def pooled(self, row: torch.Tensor, valid: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """[B, X, T] decode-time scores of the slots: the attention `row` avg-pooled along each row's real slots in
        order, the newest `w` [B, X, 1] of them first (inf). Pooled over the real slots alone, as a prompt alone
        holds them: in a padded batch a row's dead filler slots sit between its tokens (zero attention) and would
        shift its neighbours' averages; the zero padding at the ends is the one pooling itself adds."""
        T = row.shape[-1]
        slots = torch.arange(T, device=row.device)
        order = torch.where(valid, slots, T + slots).argsort(-1)  # real slots first, in slot (= position) order
        index = slots.expand_as(row)
        outside = index >= valid.sum(-1, keepdim=True) - w  # the window and the dead slots
        packed = row.float().gather(-1, order).masked_fill(outside, 0.0)
        pooled = kernels.pool1d(packed, self.kernel, "avg").masked_fill(outside, float("inf"))
        return torch.empty_like(pooled).scatter_(-1, order, pooled)

    def on_append(self, view: LayerView):
        hold = self.layer_state(view).hold
        if hold is None or not hold.evicts or not self.eviction_due(view):  # the prompt was not compressed, the
            return None  # amounts hold the vision alone (decoding never adds to it), or no eviction yet
        state = self.layer_state(view)
        valid = view.slot_valid
        w = torch.minimum(state.window.to(valid.device).view(-1, 1, 1), valid.sum(-1, keepdim=True))  # [B, Hk, 1]
        last = view.state.get("decode_mass_last")  # compiled decode: the latest row's mass, per KV head
        if last is None:
            row = view.probs(slice(None)).mean(2)  # the new rows' attention, [B, H, T]
            group = row.shape[1] // view.kv_heads
            scores = self.pooled(row, valid.repeat_interleave(group, 1), w.repeat_interleave(group, 1))
            scores = kernels.group_reduce(scores, view.kv_heads, self.agg)
        else:  # the group's mean already, and pooling commutes with it
            scores = self.pooled(last, valid, w)
        newest = view.positions.amax(-1, keepdim=True) + 1
        recent = view.positions >= newest - w
        forced = recent | view.prompt_mask(self.protected(view.layout))
        return self.keep_at_budget(view, hold, scores, forced)
