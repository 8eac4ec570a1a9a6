"""What a decode-time method (H2O, StreamingLLM, CAKE, Elastic Cache) holds a layer at while decoding: a number of
real tokens in all, or one per modality when the policy was given per-modality amounts.

Per modality, each one is held at what the prefill cut kept of it (a ratio is fixed by the prompt; a token count
larger than that lets it grow up to the count), and a modality given no amount is not held at all: it keeps every
entry, and as generated tokens are text, an unbounded text side grows by one entry per step. Vision entries never
grow while decoding, so a vision amount alone means the method evicts nothing after the prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .view import LayerView, Plan

NEVER = 1 << 62  # a hold no cache reaches


@dataclass
class Hold:
    """Real tokens per row [B]: `total` (a single budget), or `vision` / `text` (None: that modality unbounded)."""

    total: torch.Tensor | None = None
    vision: torch.Tensor | None = None
    text: torch.Tensor | None = None

    @property
    def held(self) -> list[torch.Tensor]:
        return [t for t in (self.total, self.vision, self.text) if t is not None]

    @property
    def evicts(self) -> bool:
        """Whether decoding can ever go over this hold: only tokens that join text (generated ones, a chat's next
        turn) arrive, so a hold of the vision alone never evicts, and its method may skip its per-step work."""
        return self.total is not None or self.text is not None

    def groups(self, view: LayerView) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(real slots [B, Hk, T], the most of them kept [B]) of each held group of `view`'s layer. Slots of
        generated tokens (after the prompt) are text."""
        valid = view.slot_valid
        if self.total is not None:
            return [(valid, self.total)]
        vision = view.prompt_mask(view.layout.vision) & valid
        out = []
        if self.vision is not None:
            out.append((vision, self.vision))
        if self.text is not None:
            out.append((valid & ~vision, self.text))
        return out

    def unheld(self, view: LayerView) -> torch.Tensor | None:
        """[B, Hk, T] the real slots of the modalities no amount holds (kept whatever happens), or None."""
        if self.total is not None:
            return None
        vision = view.prompt_mask(view.layout.vision)
        out = torch.zeros_like(view.slot_valid)
        if self.vision is None:
            out |= vision
        if self.text is None:
            out |= ~vision
        return out & view.slot_valid

    def never_in(self, rows: torch.Tensor) -> Hold:
        """This hold with the rows `rows` [B] (bool) never evicted from."""
        on = rows.to(self.held[0].device) if self.held else rows

        def lift(t):
            return None if t is None else torch.where(on, NEVER, t)

        return Hold(lift(self.total), lift(self.vision), lift(self.text))

    def room(self, view: LayerView, protected: torch.Tensor) -> torch.Tensor | None:
        """[B] how many of the newest tokens a method's recent window may force and still leave the hold reachable,
        given the prompt's `protected` [B, n] tokens (kept whatever the amount): the hold (in all, or of the text,
        where generated tokens go) less the protected tokens in it. None: text is not held (nothing to reach)."""
        if self.total is not None:
            held, inside = self.total, protected & view.layout.valid
        elif self.text is not None:
            held, inside = self.text, protected & view.layout.text
        else:
            return None
        return (held - inside.sum(-1).to(held.device)).clamp(min=0)


def hold_of(policy, view: LayerView, plan: Plan, grow: bool = True) -> Hold:
    """What `policy` holds `view`'s layer at while decoding, from the prompt-space `plan` its prefill cut kept;
    with `grow`, a token-count amount above that is held at the count (CAKE's count is a model-wide average, so
    it holds each layer at its share)."""
    kept = plan.kept()
    if policy.budget is not None or (policy.vision_budget is None and policy.text_budget is None):
        if grow and isinstance(policy.budget, int):
            kept = kept.clamp(min=policy.budget)
        return Hold(total=kept)
    layout = view.layout
    out = {}
    for name, modality, amount in (
        ("vision", layout.vision & layout.valid, policy.vision_budget),
        ("text", layout.text, policy.text_budget),
    ):
        if amount is None:
            continue
        held = kept_in(plan, modality)
        if grow and isinstance(amount, int):
            held = held.clamp(min=amount)
        out[name] = held
    return Hold(**out)


def kept_in(plan: Plan, modality: torch.Tensor) -> torch.Tensor:
    """[B] tokens of `modality` [B, n] a prompt-space plan keeps: its forced ones there, and the k of each pool
    inside it (per-modality plans have one pool per modality; a pool reaching outside counts for neither)."""
    forced = plan.forced
    kept = (forced & modality).sum(-1)
    for mask, k in plan.pools:
        inside = ~(mask & ~modality).any(-1)
        kept = kept + torch.where(inside, torch.minimum(k, (mask & ~forced).sum(-1)), 0)
    return kept
