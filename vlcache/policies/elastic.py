"""Elastic Cache (Liu et al., ECCV 2024, arXiv 2407.18121): anchor merging, then fixed-point elimination."""

from dataclasses import dataclass

import torch

from .. import kernels
from .base import DecodeEvicting
from .h2o import last_real
from .streaming import first_real
from .view import EvictionState, LayerView, Selection


@dataclass
class ElasticLayer(EvictionState):
    """An Elastic Cache layer while decoding: the kept `fraction` [B] of the `seen` [B] tokens, deleting from
    the fixed `point` on."""

    fraction: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    point: torch.Tensor | None = None  # [B] per row, counted in its real slots (a padded row's own post-prefill length)
    held: str = "all"  # what the fraction is of: "all" tokens, "text" only (per-modality amounts), "none" (unbounded)

    never: torch.Tensor | None = None  # [B] rows an allocator left whole: nothing deleted from them
    floor: torch.Tensor | None = None  # [B] what the prefill kept (of the text, per modality): a count holds no less

    @property
    def evicts(self) -> bool:
        return self.seen is not None and self.held != "none"

    def leave_whole(self, rows: torch.Tensor) -> None:
        self.never = rows if self.never is None else self.never | rows


@dataclass(kw_only=True)
class ElasticCache(DecodeEvicting):
    """Prefill: tokens are ranked by the attention they accumulate over all prompt rows, averaged over heads (one
    choice for every head); the top ones are anchors, and every other token is merged into its nearest anchor by
    position (the anchor's key and value become the mean of itself and its members). The first `start` tokens
    and the last prompt token are kept as they are.

    Decoding: the cache holds the kept fraction of the tokens seen. Whenever it is over, the entry at a fixed
    point P = (cache length after prefill) + `distance` is deleted (the first unprotected one from P on), so
    everything before P stays and what follows behaves as a queue. Under per-modality amounts the fraction is of
    the text seen and only text entries are deleted; with no `text_budget`, nothing is.

    `budget` is the kept fraction (the paper's 1 - r; its default r = 0.2 is budget=0.8) or a token count.

    - start (1): leading tokens always kept (the eval scripts' start_size).
    - distance (-25): the fixed point's offset from the post-prefill length; a positive value is an absolute index.
    - evict_every (1): see `DecodeEvicting`; deleting k at once from the fixed point leaves what k single deletions
      would have (the new tokens queue behind the deletable ones).
    """

    start: int = 1
    distance: int = -25
    chunk: int = 256

    name = "elastic"
    State = ElasticLayer
    paper = "https://arxiv.org/abs/2407.18121"

    def __post_init__(self):
        super().__post_init__()
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")

    def always_keep(self, view: LayerView, total: torch.Tensor) -> torch.Tensor:
        valid = view.layout.valid
        return first_real(valid, self.start) | last_real(valid, torch.ones_like(total))

    def score(self, view: LayerView) -> torch.Tensor:
        importance = view.stats(chunk=self.chunk).colsum.mean(1)  # column sums of the head-mean attention
        return importance[:, None, :].expand(-1, view.kv_heads, -1)

    def on_prefill(self, view: LayerView):
        plan = self.plan(view)
        sel = self.select(view, plan, self.score(view))
        sel = self.merge_into_anchors(view, sel, plan.forced)
        self.start_decoding(view, sel)
        return {view.layer: sel}

    def start_decoding(self, view: LayerView, sel: Selection) -> None:
        """Hold the layer at the fraction of the tokens seen that the prefill's selection `sel` kept, deleting from
        the fixed point on. With per-modality amounts the fraction is of the text alone (generated tokens are text;
        vision never grows while decoding), and text given no amount is not held: nothing is deleted."""
        real = view.layout.valid.sum(-1)
        held_slots = view.slot_valid.gather(-1, sel.indices)[:, 0]  # [B, K] real tokens the prefill kept (not filler)
        if sel.filler is not None:
            held_slots = held_slots & ~sel.filler[:, 0]
        kept = held_slots.sum(-1)
        state = self.layer_state(view)
        # the fixed point counts each row's real slots, so a row in a padded batch deletes where it would alone
        point = torch.full_like(kept, self.distance) if self.distance >= 0 else kept + self.distance
        state.point = torch.maximum(point.clamp(max=kept - 1), (kept - 1).clamp(max=self.start))
        if self.budget is not None:
            state.held, state.floor = "all", kept
            if isinstance(self.budget, float):  # the paper's floor((1 - r) * T)
                state.fraction = torch.full(real.shape, self.budget, dtype=torch.float64, device=real.device)
            state.seen = real
            return
        if self.text_budget is None:
            state.held, state.seen = "none", real
            return
        text = view.layout.text.sum(-1)
        vision = view.prompt_mask(view.layout.vision).gather(-1, sel.indices)[:, 0]
        kept_text = (held_slots & ~vision).sum(-1)
        state.held, state.seen, state.floor = "text", text, kept_text
        if not isinstance(self.text_budget, int):
            state.fraction = kept_text.double() / text.clamp(min=1).double()

    def merge_into_anchors(self, view: LayerView, sel: Selection, forced: torch.Tensor) -> Selection:
        """Fold every evicted token into the anchor nearest by position (anchors: kept and not forced). A filler slot
        (held only so every row of a padded batch has K) is no anchor and its token counts as evicted, as alone."""
        idx = sel.indices  # [B, Hk, K]
        real = view.slot_valid.gather(-1, idx) if sel.filler is None else view.slot_valid.gather(-1, idx) & ~sel.filler
        kept = torch.zeros_like(view.slot_valid).scatter_(-1, idx, real)
        evicted = view.slot_valid & ~kept
        is_anchor = ~forced[:, None, :].expand_as(kept).gather(-1, idx) & real  # [B, Hk, K]
        # a row (or head) without anchors merges nothing; the others merge as they would alone (a batch-wide check
        # left every row of a padded batch unmerged when one row had no anchor)
        evicted = evicted & is_anchor.any(-1)[..., None]
        if not bool(evicted.any()):
            return sel
        # anchors as positions, padded with +inf-like values so every row has the same count
        big = view.positions.max() + view.slots + 1
        anchor_pos = torch.where(is_anchor, idx, big).sort(-1)
        assign_anchor = kernels.position_assign(view.positions, anchor_pos.values)
        # map "k-th anchor" back to its column among the kept slots
        column = torch.arange(idx.shape[-1], device=idx.device).expand_as(idx)
        anchor_column = torch.where(is_anchor, column, idx.shape[-1]).sort(-1).values.clamp(max=idx.shape[-1] - 1)
        assign = anchor_column.gather(-1, assign_anchor)
        keys, values = kernels.merge_kv(view.keys, view.values, idx, evicted, assign, "average")
        return Selection(idx, keys, values, sel.filler)

    def on_append(self, view: LayerView):
        state = self.layer_state(view)
        if state.seen is None:  # the prompt was left whole
            return None
        seen = state.seen = state.seen + view.new  # every appended token is real (generate extends with ones); text
        if not self.eviction_due(view) or state.held == "none":
            return None
        amount = self.budget if state.held == "all" else self.text_budget
        if isinstance(amount, int):  # the count, or what the prefill kept where that is more (protected tokens)
            budget = state.floor.clamp(min=amount)
        else:
            budget = torch.floor(state.fraction * seen.double()).long()
        valid = view.slot_valid  # [B, Hk, T]
        B, Hk, T = valid.shape
        slots = torch.arange(T, device=valid.device)
        rank = valid.long().cumsum(-1) - 1  # each real slot's index among its row's (and head's) real slots
        # deletable from the fixed point on: real and not protected, and text where only the text is held. Per KV
        # head: Elastic Cache's own cut is one choice for every head, a composition's scorer may choose per head
        deletable = valid & ~view.prompt_mask(self.protected(view.layout)) & (rank >= state.point.view(-1, 1, 1))
        counted = valid
        if state.held == "text":
            counted = valid & ~view.prompt_mask(view.layout.vision)
            deletable = deletable & counted
        want = torch.minimum((counted.sum(-1) - budget.view(-1, 1)).clamp(min=0), deletable.sum(-1))  # [B, Hk]
        if state.never is not None:
            want = want.masked_fill(state.never.to(want.device).view(-1, 1), 0)
        # every row and head gives up the same number of slots: each its `want` real tokens, topped up with its
        # padding (and dead) slots; one that wants more than that number keeps its extra deletions as dead filler
        # (masked, as padding is), so no row loses a real token it would keep alone
        wanted, drop = (
            int(x) for x in torch.stack([want.max(), torch.minimum(want.max(), (want + (~valid).sum(-1)).min())])
        )
        if wanted == 0:
            return None
        order = deletable.long().cumsum(-1)  # 1 for the first deletable slot, 2 for the next, ...
        wanted_out = deletable & (order <= want[..., None])
        dropped = wanted_out & (order <= drop)
        filler = wanted_out & (order > drop)
        top_up = (drop - want).clamp(min=0)[..., None]
        dropped = dropped | (~valid & ((~valid).long().cumsum(-1) <= top_up))
        idx = slots.expand_as(valid)[~dropped].view(B, Hk, T - drop)
        dead = filler.gather(-1, idx)
        return {view.layer: Selection(idx, filler=dead if bool(dead.any()) else None)}
