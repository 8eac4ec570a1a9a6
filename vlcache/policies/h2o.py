"""H2O, heavy-hitter oracle (Zhang et al., NeurIPS 2023, arXiv 2306.14048)."""

from dataclasses import dataclass

import torch

from .. import kernels
from .base import DecodeEvicting
from .hold import Hold
from .view import EvictionState, LayerView, Plan


@dataclass
class HeldState(EvictionState):
    """A layer held at a size while decoding: `budget` (in all or per modality), of which the newest `recent` [B]
    (H2O)."""

    budget: Hold | None = None
    recent: torch.Tensor | None = None

    @property
    def evicts(self) -> bool:
        return self.budget is not None and self.budget.evicts

    def leave_whole(self, rows: torch.Tensor) -> None:
        if self.budget is not None:
            self.budget = self.budget.never_in(rows)


def last_real(valid: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """[B, T] the last n[b] positions of each row (left padding: the real tokens end every row)."""
    T = valid.shape[-1]
    pos = torch.arange(T, device=valid.device)
    return valid & (pos[None, :] >= T - n[:, None])


@dataclass(kw_only=True)
class H2O(DecodeEvicting):
    """Keeps the tokens with the largest accumulated attention ("heavy hitters") plus the most recent ones.

    Prefill scores are attention column sums over every prompt row, computed in row tiles (no n x n matrix).
    While decoding, each new token's attention row is added to the scores and, once over budget, the
    non-recent entry with the lowest score is evicted (greedy, one per step), so the cache stays at budget (per
    modality under per-modality amounts, per KV head: hold.py).

    - recent (0.5): share of the budget kept as the most recent tokens (the paper's 10% + 10%).
    - agg ("mean"): how the query heads of a GQA group combine into their KV head's score.
    - chunk (256): query rows per tile when summing the prefill attention.
    - normalize (False): divide each key's accumulated attention by the number of query rows that see it (prompt
      rows at or after it, then one per decode step), so a key is ranked by the mean attention it receives, not the
      sum: the form of kvpress's ObservedAttentionPress. Plain sums favour early keys, which more rows see.
    - evict_every (1): see `DecodeEvicting`; the scores keep accumulating every step.
    """

    recent: float = 0.5
    agg: str = "mean"
    chunk: int = 256
    normalize: bool = False

    name = "h2o"
    State = HeldState
    order_free = True  # accumulated per slot, moved with it: evictions may fill holes in place
    paper = "https://arxiv.org/abs/2306.14048"

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.recent <= 1.0:
            raise ValueError(f"recent must be in [0, 1], got {self.recent}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be True or False, got {self.normalize!r}")

    def _recent(self, total: torch.Tensor) -> torch.Tensor:
        return torch.floor(self.recent * total.double()).long()

    def always_keep(self, view: LayerView, total: torch.Tensor) -> torch.Tensor:
        return last_real(view.layout.valid, self._recent(total))

    @property
    def decode_mass(self) -> bool:
        """Compiled decode may hand over each slot's attention mass from its own decode attention (the GQA group's
        mean: `agg="mean"` only), sparing `_sums` a second attention pass (hf/compiled_decode.py)."""
        return self.agg == "mean"

    def _sums(self, view: LayerView) -> torch.Tensor:
        """[B, Hk, T] attention each slot received from this forward's query rows, summed over them."""
        mass = view.state.get("decode_mass")  # set only for the call compiled decode makes
        if mass is not None:
            return mass
        return kernels.group_reduce(view.stats(chunk=self.chunk).colsum, view.kv_heads, self.agg)

    def _ranked(self, view: LayerView, sums: torch.Tensor) -> torch.Tensor:
        """What slots are ranked by: the sums, or with `normalize` the sums over the rows that saw each slot."""
        if not self.normalize:
            return sums
        return sums / view.slot_state["h2o_rows"].clamp(min=1)

    def score(self, view: LayerView) -> torch.Tensor:
        sums = self._sums(view)
        if not self.normalize:
            return sums
        return sums / rows_seeing(view).clamp(min=1)

    def observe(self, view: LayerView) -> torch.Tensor:
        """The prompt rows' attention sums, kept per slot for decoding to add to; returns the prefill scores."""
        sums = self._sums(view)
        if self.normalize:
            view.slot_state["h2o_rows"] = rows_seeing(view)
        view.slot_state["h2o"] = sums  # the cache gathers it with the kept slots
        return self._ranked(view, sums)

    def start_decoding(self, view: LayerView, plan: Plan) -> None:
        """Hold the layer at what its cut leaves (in all or per modality, hold.py), the newest `recent` share of the
        budget kept (`plan`, the prompt-space budget it was cut to, is not needed: the hold counts the layer)."""
        state = self.layer_state(view)
        state.budget = self.growth_budget()
        state.recent = self._recent(self.total_budget(view.layout))

    def on_prefill(self, view: LayerView):
        scores = self.observe(view)
        plan = self.plan(view)
        self.start_decoding(view, plan)
        return {view.layer: self.select(view, plan, scores)}

    def cut_scores(self, view: LayerView) -> torch.Tensor:
        return self._ranked(view, view.slot_state["h2o"])  # on_prefill's accumulated attention of this layer

    def on_append(self, view: LayerView):
        budget = self.layer_state(view).budget
        if budget is None or not budget.evicts:  # the prompt was left whole (a composition's allocator), or the
            return None  # amounts hold the vision alone, which decoding never adds to: no scores needed
        acc = view.slot_state["h2o"] + self._sums(view)
        view.slot_state["h2o"] = acc
        if self.normalize:
            view.slot_state["h2o_rows"] = view.slot_state["h2o_rows"] + rows_seeing(view)
        if not self.eviction_due(view):
            return None
        # recent = the newest `recent` real tokens of each row, by position
        end = view.positions.amax(-1, keepdim=True) + 1  # [B, Hk, 1]
        state = self.layer_state(view)
        recent = view.positions >= end - state.recent.view(-1, 1, 1)
        forced = recent | view.prompt_mask(self.protected(view.layout))
        return self.keep_at_budget(view, state.budget, self._ranked(view, acc), forced)


def rows_seeing(view: LayerView) -> torch.Tensor:
    """[B, Hk, T] how many of this forward's real query rows see each slot: rows at or after it (causal, by slot),
    padding rows left out. At a prefill of n rows without padding, slot j is seen by n - j rows."""
    B, T = view.slot_valid.shape[0], view.slots
    slots = view.query_slots().to(view.keys.device)  # [B, R]
    real = view.query_valid().to(torch.float32).to(view.keys.device)
    per_slot = torch.zeros(B, T, device=view.keys.device).scatter_add_(1, slots, real)  # rows whose query is slot t
    seen = per_slot.flip(-1).cumsum(-1).flip(-1)  # rows at or after t
    return (seen[:, None, :] * view.slot_valid).contiguous()  # padding keys: seen by nobody
