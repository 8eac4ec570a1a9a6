"""Lookahead without waiting (`lookahead_draft`, after Lookahead Q-Cache, arXiv 2505.20334).

Right after the prompt's forward, before `generate` takes its first step: every layer still holds the whole prompt
(lookahead keeps it) and the prompt's scoring rows' attention. We draft g tokens greedily. In every layer a draft
row is first scored against the whole layer, then attends only over the cut that the rows so far give (the
prompt's and the drafts', this one included) plus the drafts: a provisional cut that sharpens with every draft.
Then the drafts' entries are rolled back, every layer is cut by all the rows, and `generate` goes on from the
prompt's logits over the final cache: the drafts are pseudo queries, never output. With g = 1 this is exactly
`lookahead=1` (that cut, before the first step's attention); Lookahead Q-Cache drafts over a fixed SnapKV cut
instead, which on the embedded models loses the answer's patch before the drafts can look for it.

The draft forwards go through the model's own `prepare_inputs_for_generation` (positions, M-RoPE deltas and masks
as `generate` would make them), with the cache under the keyword the installed transformers uses.
"""

from __future__ import annotations

import torch

from .attention import layer_mask
from .cache import CompressedCache, CompressibleLayer
from .compat import CACHE_KWARG


def check_draftable(cache: CompressedCache) -> None:
    """Drafting rolls its entries back, which only vlcache's own layers can do (checked when a session attaches;
    quantized layers, the other kind, are refused with the policy's settings)."""
    if any(not isinstance(layer, CompressibleLayer) for layer in cache.layers):
        raise ValueError(
            "lookahead_draft needs every decoder layer to be a full-attention layer vlcache manages (this model has "
            "sliding-window layers, e.g. Gemma 3): use lookahead without lookahead_draft"
        )


class Draft:
    """The state of one drafting: the lengths to roll back to, the drafts' rows, the drafted tokens."""

    def __init__(self, cache: CompressedCache, layers: list[int]):
        self.length = {li: cache.layers[li].physical_length for li in layers}
        self.seen = {li: cache.layers[li].seen for li in layers}
        self.seq_valid = cache.seq_valid
        self.rows: dict[int, torch.Tensor] = {}  # layer -> [B, H, T] the drafts' attention over the prompt, summed
        self.steps = 0
        self.tokens: list[torch.Tensor] = []  # [B, 1] each drafted token (the first is the prompt's own next token)

    def attend(self, session, module, query, key, value, stock, eager: bool, **kwargs):
        """One draft row in one layer: score it against the whole layer, then attend over the cut that the rows so
        far (this one included) give, plus the drafts."""
        cache, li = session.cache, module.layer_idx
        layer = cache.layers[li]
        if not session.runner.looking(cache, li):  # left whole by its policy (the prompt fits): nothing to score
            mask = layer_mask(cache.slot_valid(layer), query.shape[2], query.shape[1], query.dtype, eager)
            return stock(module, query, key, value, mask, **kwargs)
        view = session.runner.view(cache, li, query, kwargs.get("scaling"))
        T0, T = self.length[li], view.slots
        with torch.no_grad():
            probs = view.probs(slice(None)).sum(2)[..., :T0]  # the prompt slots are what the cut chooses among
            rows = self.rows[li] = probs if li not in self.rows else self.rows[li] + probs
            gen = torch.nn.functional.pad(rows, (0, T - T0))
            keep = session.policy.provisional_keep(view, gen, self.steps + 1)
        allowed = (keep | (view.positions >= T0)) & cache.slot_valid(layer)
        mask = layer_mask(allowed, query.shape[2], query.shape[1], query.dtype, eager)
        return stock(module, query, key, value, mask, **kwargs)

    def roll_back(self, cache: CompressedCache) -> None:
        """Forget the drafts' entries: every layer back to the prompt it held."""
        for li, T0 in self.length.items():
            layer = cache.layers[li]
            layer.keys, layer.values = layer.keys[:, :, :T0], layer.values[:, :, :T0]
            layer.seen = self.seen[li]
            if layer.positions is not None:
                layer.positions = layer.positions[..., :T0]
            for name, t in layer.slot_state.items():
                layer.slot_state[name] = t[..., :T0]
        cache.seq_valid = self.seq_valid


def run_draft(session, cache: CompressedCache, output, kwargs) -> None:
    """Draft `policy.lookahead` tokens after the prompt's forward, then cut every layer (see the module's doc)."""
    policy, runner, model = session.policy, session.runner, session.model
    layers = cache.compressible()
    draft = Draft(cache, layers)
    ids = kwargs["input_ids"]
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else torch.ones_like(ids)
    # the prompt's last position (1D, or M-RoPE's 3-4 rows) moves on by one per draft in every row, as for any text
    # token; without position ids given, the model's own preparation makes them as generate would
    positions = kwargs.get("position_ids")
    last = positions[..., -1:] if isinstance(positions, torch.Tensor) else None
    token = output.logits[:, -1:].argmax(-1)
    cache.draft = draft
    try:
        with torch.no_grad():
            for _ in range(policy.lookahead):
                draft.tokens.append(token)
                ids = torch.cat([ids, token.to(ids.device)], dim=-1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                given = {} if last is None else {"position_ids": last + draft.steps + 1}
                inputs = model.prepare_inputs_for_generation(
                    ids, next_sequence_length=1, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache}, **given
                )
                out = model(**inputs, return_dict=True)
                draft.steps += 1
                token = out.logits[:, -1:].argmax(-1)
    finally:
        cache.draft = None
        draft.roll_back(cache)
    with torch.no_grad():
        for li in layers:
            if li not in draft.rows:  # a layer its policy left whole
                continue
            view = runner.view(cache, li)
            runner.apply(cache, policy.lookahead_cut(view, draft.rows[li], draft.steps))
    cache.drafted = torch.cat(draft.tokens, dim=-1)  # [B, g], for inspection: pseudo tokens, never output
