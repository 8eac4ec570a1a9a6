"""Scoring with the answer's own first queries (`lookahead`): the prompt stays whole for the first g generated
tokens, whose attention joins the prompt's scoring rows', then each layer is cut (`Policy.lookahead*` settings).

`Lookahead` holds the hooks every policy has (`Policy` derives from it); a method that scores from a set of query
rows (`looks_ahead`) supplies `observed` and `ranked`.
"""

from __future__ import annotations

import torch

from .. import kernels
from .budget import per_head, pool_rank, rank_desc, select_indices
from .heads import adaptive_head_budgets
from .view import LayerView, LookaheadState, Plan, Selection


class Lookahead:
    """The lookahead hooks of `Policy` (its settings `lookahead`, `lookahead_share`, `lookahead_rule`,
    `frame_min`, `head_budgets`, `head_floor` and its `plan` / `select` are the policy's own)."""

    def lookahead_step(self, view: LayerView) -> dict[int, Selection] | None:
        """Before a decode step's attention in this layer (`lookahead` only): add the new rows' attention to the
        scoring rows'; on the g-th generated token, cut the layer to its budget (generated tokens are kept)."""
        rows = view.probs(slice(None)).sum(2)  # [B, H, T]
        gen = view.slot_state.get("lookahead_gen")
        gen = rows if gen is None else gen + rows
        st = lookahead_state(view)
        st.steps += view.new
        steps = st.steps
        if steps < self.lookahead:
            view.slot_state["lookahead_gen"] = gen
            return None
        return self.lookahead_cut(view, gen, steps)

    def lookahead_cut(self, view: LayerView, gen: torch.Tensor, steps: int) -> dict[int, Selection]:
        """Cut the layer by the prompt's scoring rows and `steps` generated (or drafted) rows, whose attention
        summed over them is `gen` [B, H, T]; generated tokens are kept."""
        sel = self.lookahead_select(view, self.lookahead_plan(view).to_slots(view, keep_generated=True), gen, steps)
        view.slot_state.pop("lookahead")  # per query head: not kept aligned by compaction
        view.slot_state.pop("lookahead_gen", None)
        lookahead_state(view).done = True
        return {view.layer: sel}

    def lookahead_select(self, view: LayerView, plan: Plan, gen: torch.Tensor | None, steps: int) -> Selection:
        """What a lookahead cut keeps within `plan` (slot space): by the prompt's scoring rows' mean attention
        (`view.slot_state["lookahead"]`, [B, H, T]) and that of `steps` generated rows summed in `gen`, combined by
        `lookahead_rule`; by the prompt's rows alone without generated ones."""
        prompt = view.slot_state["lookahead"]
        if gen is None or steps == 0:
            return self.select(view, plan, self.ranked(view, prompt))
        s, gen = self.lookahead_share, gen / steps
        mix = (1.0 - s) * prompt + s * gen
        lin = self.ranked(view, mix)
        if self.lookahead_rule == "mix" or s in (0.0, 1.0):
            return self.select(view, plan, lin)
        if self.frame_min > 0:  # each frame's minimum by the mix, then the union for the rest
            plan = self._with_frame_minimum(view, plan, lin)
        Hk, T = view.kv_heads, view.slots
        forced = per_head(plan.forced, Hk) & view.slot_valid
        by_prompt, by_gen = self.ranked(view, prompt), self.ranked(view, gen)
        strongest = kernels.group_reduce(mix, Hk, "max")  # what Ada-KV's per-head split follows
        key = torch.full(lin.shape, float("inf"), dtype=torch.float64, device=lin.device)
        pools = []
        for mask, k in plan.pools:
            pool = per_head(mask, Hk) & view.slot_valid & ~forced
            rp, rg, rl = (pool_rank(x, pool) for x in (by_prompt, by_gen, lin))
            turn = torch.minimum(rg / s, rp / (1.0 - s))  # the turn at which either side would take the slot
            # turns as dense ranks (distinct turns differ by >= 1, whatever the share), then the mix's rank breaks
            # ties: one float64 key, exact for any cache a GPU holds
            turn = torch.unique(turn, return_inverse=True)[1].double()
            key = torch.where(pool, turn * (T + 1) + rl, key)
            if self.head_budgets == "adaptive" and Hk > 1:
                k = adaptive_head_budgets(strongest, pool, k, self.head_floor)
            pools.append((pool, k))
        scores = -rank_desc(-key).float()  # ranks (< 2^24) are exact in float32, which select_indices ranks in
        return Selection(*select_indices(scores, forced, pools, view.slot_valid, with_filler=True))

    def provisional_keep(self, view: LayerView, gen: torch.Tensor | None = None, steps: int = 0) -> torch.Tensor:
        """[B, Hk, T] the prompt slots a lookahead cut by the rows so far would keep, real ones only: what a draft
        step attends over (`lookahead_draft`)."""
        sel = self.lookahead_select(view, self.lookahead_plan(view).to_slots(view), gen, steps)
        kept = True if sel.filler is None else ~sel.filler
        keep = torch.zeros_like(view.slot_valid).scatter_(-1, sel.indices, kept)
        return keep & view.slot_valid & (view.positions < view.layout.length)

    def observed(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor]:
        """`looks_ahead` policies: ([B, H, T] the attention each slot receives from the prompt's scoring rows,
        summed over them, per query head; [B] how many rows that is): the rows generated tokens join."""
        raise NotImplementedError

    def ranked(self, view: LayerView, sums: torch.Tensor) -> torch.Tensor:
        """`looks_ahead` policies: [B, Hk, T] scores from `observed`'s sums (with the generated rows' added)."""
        raise NotImplementedError

    def lookahead_plan(self, view: LayerView) -> Plan:
        """The prompt-space budget a lookahead cut keeps in this layer: what a layer-splitting allocator set after
        the prefill (`LookaheadState.plan`), else `plan`."""
        plan = lookahead_state(view).plan
        return self.plan(view) if plan is None else plan


def hold_for_lookahead(view: LayerView, sums: torch.Tensor, rows: torch.Tensor) -> None:
    """Keep the prompt's scoring rows' mean attention [B, H, T] (`sums` over `rows` [B] rows) for the generated rows
    to join (`Policy.lookahead_step`); the layer stays whole until then."""
    view.slot_state["lookahead"] = sums / rows.clamp(min=1).view(-1, 1, 1).to(sums.dtype)


def lookahead_state(view: LayerView) -> LookaheadState:
    """The lookahead's state of `view`'s layer, made on first use."""
    state = view.state.get("lookahead")
    if state is None:
        state = view.state["lookahead"] = LookaheadState()
    return state
