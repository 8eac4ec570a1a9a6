"""What a decode-time method (H2O, StreamingLLM, CAKE, Elastic Cache's schedule in compositions) holds a layer at
while decoding: a number of real tokens in all, or one per modality when the policy was given per-modality amounts.

The numbers are what the prefill left in the layer, counted per row and KV head at the first decode step: whatever
made the cut (its plan, `frame_min`'s forced tokens, Ada-KV's per-head split, a cascading re-cut, merging), each
head stays at what it holds. A token-count amount larger than the prompt (or its modality) lets the cache first
grow up to the count.

Per modality, a modality given no amount is not held at all: it keeps every entry, and as generated tokens are
text, an unbounded text side grows by one entry per step. Vision entries never grow while decoding, so a vision
amount alone means the method evicts nothing after the prefill. Protected tokens and a method's recent window are
kept whatever the hold: where they outgrow it, the layer holds them and nothing else of that group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .view import LayerView

NEVER = 1 << 62  # a hold no cache reaches
GROUPS = ("total", "vision", "text")


@dataclass
class Hold:
    """The groups held (`held`: "total", or "vision" and / or "text"), token-count floors per group (`grow`), rows
    never evicted from (`never` [B]), and once settled each group's count per row and KV head (`counts` [B, Hk])."""

    held: tuple[str, ...]
    grow: dict[str, int] = field(default_factory=dict)
    never: torch.Tensor | None = None
    counts: dict[str, torch.Tensor] | None = None

    @property
    def evicts(self) -> bool:
        """Whether decoding can ever go over this hold: only tokens that join text (generated ones, a chat's next
        turn) arrive, so a hold of the vision alone never evicts, and its method may skip its per-step work."""
        return "total" in self.held or "text" in self.held

    def never_in(self, rows: torch.Tensor) -> Hold:
        """This hold with the rows `rows` [B] (bool) never evicted from as well."""
        never = rows if self.never is None else self.never | rows.to(self.never.device)
        return Hold(self.held, self.grow, never, self.counts)

    def masks(self, view: LayerView) -> dict[str, torch.Tensor]:
        """The real slots [B, Hk, T] of each held group of `view`'s layer; generated tokens are text."""
        valid = view.slot_valid
        if "total" in self.held:
            return {"total": valid}
        vision = view.prompt_mask(view.layout.vision) & valid
        return {g: vision if g == "vision" else valid & ~vision for g in self.held}

    def unheld(self, view: LayerView) -> torch.Tensor | None:
        """[B, Hk, T] the real slots of the modalities no amount holds (kept whatever happens), or None."""
        if "total" in self.held:
            return None
        vision = view.prompt_mask(view.layout.vision)
        out = torch.zeros_like(view.slot_valid)
        if "vision" not in self.held:
            out |= vision
        if "text" not in self.held:
            out |= ~vision
        return out & view.slot_valid

    def settle(self, view: LayerView) -> None:
        """Count what the prefill left of each group in `view`'s layer (its prompt entries), once."""
        if self.counts is not None:
            return
        layout = view.layout
        prompt = (view.positions >= 0) & (view.positions < layout.length)
        sizes = {"total": layout.valid, "vision": layout.vision & layout.valid, "text": layout.text}
        self.counts = {}
        for g, mask in self.masks(view).items():
            n = (mask & prompt).sum(-1)  # [B, Hk]
            if g in self.grow:  # a count above the prompt's: the cache grows up to it (a layer given less than the
                # count by a layer-splitting rule, in a longer prompt, stays at its share)
                short = sizes[g].sum(-1).to(n.device) < self.grow[g]
                n = torch.where(short.view(-1, 1), n.clamp(min=self.grow[g]), n)
            self.counts[g] = n

    def groups(self, view: LayerView) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(real slots [B, Hk, T], the most of them kept [B, Hk]) of each held group of `view`'s layer."""
        self.settle(view)
        out = []
        for g, mask in self.masks(view).items():
            n = self.counts[g]
            if self.never is not None:
                n = n.masked_fill(self.never.to(n.device).view(-1, 1), NEVER)
            out.append((mask, n))
        return out


def hold_of(policy, grow: bool = True) -> Hold:
    """What `policy` holds a layer at while decoding (counted at the first decode step, see the module docstring);
    with `grow`, a token-count amount is a floor (CAKE's count is a model-wide average, so it holds each layer at
    what its share left)."""
    if policy.budget is not None or (policy.vision_budget is None and policy.text_budget is None):
        floors = {"total": policy.budget} if grow and isinstance(policy.budget, int) else {}
        return Hold(("total",), floors)
    amounts = {"vision": policy.vision_budget, "text": policy.text_budget}
    held = tuple(g for g in ("vision", "text") if amounts[g] is not None)
    floors = {g: amounts[g] for g in held if grow and isinstance(amounts[g], int)}
    return Hold(held, floors)
