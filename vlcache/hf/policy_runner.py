"""Runs a policy over a `CompressedCache`: builds each layer's view, calls the hooks, applies the selections.

The session calls it from inside the attention wrapper; tests call it directly on hand-made tensors, so both
go through the same code.
"""

from __future__ import annotations

import torch

from ..policies import Policy
from ..policies.view import Eviction, LayerView, Request
from .cache import CompressedCache, CompressibleLayer


class PolicyRunner:
    def __init__(self, policy: Policy, heads: int):
        self.policy = policy
        self.heads = heads  # query heads, for views of a layer without new rows
        self.appends = policy.decodes
        self.prune_at = policy.prune_at
        self.lookahead = policy.lookahead

    def looking(self, cache: CompressedCache, li: int) -> bool:
        """Whether layer `li` still waits for generated rows (`lookahead`): then `before_attention` runs."""
        state = cache.layers[li].state.get("lookahead")
        return bool(self.lookahead) and cache.prefilled and not (state is not None and state.done)

    def before_attention(self, cache: CompressedCache, li: int, query: torch.Tensor, scaling: float | None) -> None:
        """A decode step's queries, before layer `li` attends (its keys already hold the new tokens): the
        lookahead's accumulation, and on its last step the cut, so this step attends over the kept entries."""
        view = self.view(cache, li, query, scaling)
        with torch.no_grad():
            self.apply(cache, self.policy.lookahead_step(view))

    def layer_forward(self, cache: CompressedCache, li: int, query: torch.Tensor, scaling: float | None) -> None:
        """After layer `li`'s attention over `query` (its new rows): the prefill or the append hook. With
        prune_at = K, layers after K hold what K passed on and are left to themselves."""
        if scaling is not None:
            cache.layers[li].state.setdefault("_scale", scaling)
        if (cache.prefilled and not self.appends) or (self.prune_at is not None and li > self.prune_at):
            return
        view = self.view(cache, li, query, scaling)
        with torch.no_grad():
            sels = self.policy.on_append(view) if cache.prefilled else self.policy.on_prefill(view)
            if li == self.prune_at and not cache.prefilled:
                cache.cut = self.policy.cut(view)  # before `apply`: the view still holds the whole prompt
        self.apply(cache, sels)

    def finish_prefill(self, cache: CompressedCache) -> None:
        """All layers have seen the prompt: the whole-model step, then the cache counts as prefilled."""
        with torch.no_grad():
            self.apply(cache, self.policy.after_prefill(self.request(cache)))
            if self.policy.quantizes:  # what is kept, selected and merged, is quantized now (not in a window)
                cache.quantize(self.policy)
        cache.prefilled = True
        cache.cut = None

    def request(self, cache: CompressedCache) -> Request:
        if cache.request is None:
            layers = cache.compressible()
            if self.prune_at is not None:  # the policy spreads its budgets over the layers it manages
                layers = [li for li in layers if li <= self.prune_at]
            cache.request = Request(layers, cache.shared, lambda layer: self.view(cache, layer))
        return cache.request

    def view(self, cache: CompressedCache, li: int, query: torch.Tensor | None = None, scaling=None) -> LayerView:
        """The policy's view of layer `li`; without `query`, the layer as it stands (no new rows)."""
        layer = cache.layers[li]
        request = self.request(cache)
        if query is None:
            B, _, _, d = layer.keys.shape
            query = layer.keys.new_zeros(B, self.heads, 0, d)
        if scaling is None:
            scaling = layer.state.get("_scale", query.shape[-1] ** -0.5)
        keys, values = layer.dense()  # a quantized layer: dequantized, only for the policies that look at them
        return LayerView(
            layer=li,
            depth=request.layers.index(li),
            num_layers=len(request.layers),
            query=query,
            keys=keys,
            values=values,
            scale=scaling,
            layout=cache.layout,
            positions=layer.slot_positions(),
            slot_valid=cache.slot_valid(layer),
            new=query.shape[2],
            state=layer.state,
            shared=cache.shared,
            slot_state=layer.slot_state,
            request=request,
            query_positions=cache.query_positions if not cache.prefilled and query.shape[2] else None,
            all_valid=not cache.padded and not layer.has_dead,
        )

    @staticmethod
    def apply(cache: CompressedCache, selections) -> None:
        for li, sel in (selections or {}).items():
            layer = cache.layers[li]
            if not isinstance(layer, CompressibleLayer):
                raise ValueError(f"policy selected entries of layer {li}, which is not compressible (sliding window)")
            if isinstance(sel, Eviction):
                layer.evict(sel)
            else:
                layer.compact(sel)
