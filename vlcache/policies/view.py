"""The data a policy is shown and returns: one layer's view (`LayerView`), the request around it (`Request`), a
layer's budget in slot space (`Plan`), what a layer keeps (`Selection`) or drops while decoding (`Eviction`), and the
small typed state a method carries between calls (`LookaheadState`, `EvictionState`, `LayerStatistics`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import kernels
from ..modality import Layout


@dataclass
class Selection:
    """What one layer keeps: `indices` [B, Hk, K] into its current slots, ascending. When `keys`/`values`
    ([B, Hk, K, d]) are given they replace the gathered entries (merging policies). `filler` [B, Hk, K] marks
    slots a row holds only so that every row has K slots: they are masked out as padding is."""

    indices: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    filler: torch.Tensor | None = None


@dataclass
class Eviction:
    """What one layer drops while decoding: `slots` [B, Hk, E], E per row and head. The layer moves its last
    surviving entries into the holes instead of copying every survivor (`Selection`), so the slots no longer
    follow the sequence order: only for policies whose scores do not depend on it (`Policy.order_free`)."""

    slots: torch.Tensor


@dataclass
class LayerStatistics:
    """A per-layer statistic of the prompt, per prompt in the batch (VL-Cache's densities, CAKE's preferences):
    what a layer-splitting allocator measures in each layer before it splits the budget."""

    by_layer: dict[int, list[float]] = field(default_factory=dict)

    def rows(self, layers: list[int]) -> list[list[float]]:
        """Per prompt, the value of each of `layers`."""
        return [list(r) for r in zip(*[self.by_layer[layer] for layer in layers])]


@dataclass
class LookaheadState:
    """One layer waiting for generated rows (`lookahead`): steps seen, whether it was cut, the budget to cut to
    when a layer-splitting allocator set it after the prefill."""

    steps: int = 0
    done: bool = False
    plan: Plan | None = None


@dataclass
class EvictionState:
    """What a decode-time method carries for one layer between steps: tokens appended since its last eviction."""

    pending: int = 0

    @property
    def evicts(self) -> bool:
        """Whether the layer can still be evicted from while decoding (methods whose hold may rule it out say so)."""
        return True

    def leave_whole(self, rows: torch.Tensor) -> None:
        """Never evict from the prompts `rows` [B] (bool) while decoding: an allocator left them whole, as it would
        each of them alone."""
        raise NotImplementedError(f"{type(self).__name__} cannot leave rows whole")


@dataclass
class Request:
    """What a policy may reach beyond the layer in hand, for one request (one prompt batch).

    - layers: indices of the compressible layers, in order.
    - shared: one dict for the policy's cross-layer state (densities, preferences).
    - view(l): a fresh view of layer l as it is now (no query rows), to re-select a layer that was already
      compacted (CAKE's cascading) or to select every layer at once (VL-Cache).
    """

    layers: list[int]
    shared: dict
    view: Callable[[int], LayerView]


@dataclass
class LayerView:
    """One decoder layer as a policy sees it, right after an attention forward.

    - query [B, H, q, d]: the post-RoPE queries of the rows this forward computed (the whole prompt at prefill).
    - keys / values [B, Hk, T, d]: the layer's cache after appending them (post-RoPE keys, as HF stores them).
    - positions [B, Hk, T]: the original sequence position of every slot. slot_valid [B, Hk, T]: False at padding.
    - layer: index in the model (and in the cache); depth / num_layers: rank among the compressible layers
      (sliding-window layers are left out), which is what layer-adaptive budgets are spread over.
    - new: query rows this forward computed. They are the last `new` slots, unless `query_positions` [B, new]
      says which slots they are (image reuse recomputes a subset of a prompt whose other slots were spliced in).
    - state: this layer's persistent dict for the request (a policy keeps one typed object in it: `Policy.layer_state`,
      `LookaheadState`); shared: one dict shared by all layers of the request.
    - slot_state: per-slot tensors [B, Hk, T] that the cache keeps aligned (gathered on compaction, zero-extended
      on append), for scores that accumulate while decoding.
    """

    layer: int
    depth: int
    num_layers: int
    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scale: float
    layout: Layout
    positions: torch.Tensor
    slot_valid: torch.Tensor
    new: int
    state: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
    slot_state: dict = field(default_factory=dict)
    request: Request | None = None
    query_positions: torch.Tensor | None = None
    all_valid: bool = False  # known on the host: no padding and no filler slots (slot_valid is all True)

    @property
    def slots(self) -> int:
        return self.keys.shape[2]

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    def query_slots(self, rows: slice | None = None) -> torch.Tensor:
        """[B, R] slot index of the query rows (for causal masking)."""
        if self.query_positions is not None:
            s = self.query_positions
            return s if rows is None else s[:, rows]
        B, T = self.keys.shape[0], self.slots
        s = torch.arange(T - self.new, T, device=self.keys.device)
        if rows is not None:
            s = s[rows]
        return s.expand(B, -1)

    def query_valid(self, rows: slice | None = None) -> torch.Tensor:
        """[B, R] False for query rows that are padding."""
        slots = self.query_slots(rows)
        return self.slot_valid[:, 0].gather(1, slots.to(self.slot_valid.device))

    def key_valid(self) -> torch.Tensor:
        """[B, T] if every KV head holds the same slots' validity, else [B, Hk, T]."""
        v = self.slot_valid
        if self.all_valid:  # no device sync on every decode step of every layer
            return v[:, 0]
        return v[:, 0] if bool((v == v[:, :1]).all()) else v

    def prompt_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A prompt mask [B, n] moved to slot space [B, Hk, T]; slots of generated tokens are False."""
        n = mask.shape[1]
        pos = self.positions
        inside = (pos >= 0) & (pos < n)  # filler slots (position -1) belong to no token
        return mask.gather(1, pos.clamp(0, n - 1).flatten(1)).view_as(pos) & inside

    def probs(self, rows: slice) -> torch.Tensor:
        """Attention probabilities of some of this forward's query rows, [B, H, R, T] fp32 (small R only)."""
        return kernels.attention_probs(
            self.query[:, :, rows], self.keys, self.scale, self.query_slots(rows), self.key_valid()
        )

    def stats(self, rows: slice | None = None, **kw) -> kernels.AttentionStats:
        """Tiled attention column statistics over this forward's query rows (all of them by default)."""
        q = self.query if rows is None else self.query[:, :, rows]
        return kernels.attention_stats(
            q, self.keys, self.scale, self.query_slots(rows), self.key_valid(), self.query_valid(rows), **kw
        )


@dataclass
class Plan:
    """Budget of one layer in slot space: `forced` [B, T] slots that are always kept, and pools of candidates
    (mask [B, T], how many to keep per row [B]) among which the best-scoring are kept."""

    forced: torch.Tensor
    pools: list[tuple[torch.Tensor, torch.Tensor]]

    def kept(self) -> torch.Tensor:
        """[B] slots kept per row (for a prompt-space plan; per head it is the same)."""
        k = self.forced.sum(-1)
        for _, n in self.pools:
            k = k + n
        return k

    def keep_whole(self, layout, rows: torch.Tensor) -> Plan:
        """This prompt-space plan with the prompts `rows` [B] (bool) kept whole (CAKE leaves one that fits)."""
        if not bool(rows.any()):
            return self
        forced = self.forced | (layout.valid & rows[:, None])
        return Plan(forced, [(mask & ~rows[:, None], torch.where(rows, 0, k)) for mask, k in self.pools])

    def to_slots(self, view: LayerView, keep_generated: bool = False) -> Plan:
        """This prompt-space plan mapped onto the current slots of `view`'s layer ([B, Hk, T] masks): what a
        policy needs to select again in a layer that was already compacted. Slots of generated tokens are in no
        pool; with `keep_generated` they are forced (a cut after some decode steps keeps what was generated).
        Only real slots are forced: padding and filler never are."""
        forced = view.prompt_mask(self.forced)
        if keep_generated:
            forced = forced | (view.positions >= view.layout.length)
        return Plan(forced & view.slot_valid, [(view.prompt_mask(m), k) for m, k in self.pools])
