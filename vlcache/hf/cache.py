"""A transformers `Cache` whose full-attention layers can shrink, each to its own length.

Three lengths are kept apart:
- logical (`get_seq_length()`): tokens of the request, prompt plus generated. `generate` slices new input and
  Qwen-VL builds M-RoPE positions from it, so it must never shrink;
- sequence (`layer.seen`): tokens that entered the language model. It is smaller than the logical length by the
  vision tokens temporal merging dropped before the model (`layer.hidden`); slot positions count in it;
- physical (`physical_length(l)`): entries a layer holds. Masks are built from it (by vlcache's attention hook).

Every slot remembers the position of its token in that sequence (`positions`, [B, Hk, T]), so evicting never
changes what survives and stats can say which modality was kept. (RoPE phases are the model's own: vlcache gives
the rotary embedding the original positions of the tokens it keeps.) A layer after `prune_at` receives only the
tokens kept there: `incoming` gives their positions before its first update. Sliding-window layers (Gemma 3) stay stock
`DynamicSlidingWindowLayer`s: their masks come from a running count, so they are never pruned.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..compression_stats import CompressionStats, LayerStats
from ..modality import Layout
from ..policies.view import Eviction, Selection
from .compat import init_layer, replicate_layers_as, require

DynamicCache, DynamicLayer = require("DynamicCache", "DynamicLayer")

DEAD = -1  # position of a filler slot: kept for shape in a batch, never attended to


class CompressibleLayer(DynamicLayer):
    """A `DynamicLayer` that can be compacted to any subset of its slots and remembers their positions."""

    def __init__(self, **kwargs):
        super().__init__()
        self.seen = 0  # tokens appended in the language model's sequence (slot positions count in it)
        self.hidden = 0  # prompt tokens dropped before the language model (temporal merging): logical = seen + hidden
        self.incoming: tuple[torch.Tensor, int] | None = (
            None  # (positions [B, Hk, m], prompt length) of the next update
        )
        self.positions: torch.Tensor | None = None  # [B, Hk, T] long; None while slots == positions (never compacted)
        self.slot_state: dict[str, torch.Tensor] = {}  # per-slot policy tensors [B, Hk, T], kept aligned
        self.state: dict = {}  # per-layer policy state for the request
        self.has_dead = False  # some slots hold filler (position DEAD), masked like padding
        self.fill_at: torch.Tensor | None = None  # image reuse: slots the next update writes instead of appending
        self._kbuf = self._vbuf = None  # append buffers: `keys`/`values` are views of their first slots

    GROW = 256  # spare slots reserved when an append buffer is (re)allocated: one reallocation per 256 decode steps

    def update(self, key_states, value_states, *args, **kwargs):
        if self.fill_at is not None:  # recomputed rows of a spliced prompt overwrite their slots
            idx = self.fill_at.to(self.keys.device)
            self.keys[:, :, idx] = key_states.to(self.keys.dtype)
            self.values[:, :, idx] = value_states.to(self.values.dtype)
            return self.keys, self.values
        keys, values = self._append(key_states, value_states)
        new = key_states.shape[-2]
        if self.incoming is not None:  # a layer after prune_at: its rows are the kept tokens, not a contiguous run
            positions, length = self.incoming
            self.incoming = None
            B, H = key_states.shape[:2]
            self.positions = positions.to(key_states.device).expand(B, H, new).contiguous()
            self.has_dead = bool((self.positions == DEAD).any())
            self.seen = length
            return keys, values
        start, self.seen = self.seen, self.seen + new
        if self.positions is not None:
            B, H = key_states.shape[:2]
            fresh = torch.arange(start, start + new, device=self.positions.device).expand(B, H, new)
            self.positions = torch.cat([self.positions, fresh], dim=-1)
        for name, t in self.slot_state.items():
            self.slot_state[name] = torch.cat([t, t.new_zeros(*t.shape[:-1], new)], dim=-1)
        return keys, values

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append new entries into spare room at the end of a preallocated buffer, `self.keys` being a view of its
        used part. `DynamicLayer` concatenates instead, reallocating the whole layer on every decode step; with
        per-layer lengths that all differ after compression, those ever-changing sizes defeat the CUDA caching
        allocator (a 7B model decoding over 128K tokens ran several times slower)."""
        if not self.is_initialized:
            init_layer(self, key_states, value_states)
        T, new = self.physical_length, key_states.shape[-2]
        if T == 0:  # the prompt: held exactly, it is usually compressed right away
            self.keys, self.values = key_states.contiguous(), value_states.contiguous()
            self._kbuf = self._vbuf = None
            return self.keys, self.values
        kbuf, vbuf = self._kbuf, self._vbuf
        fits = (
            kbuf is not None
            and T + new <= kbuf.shape[-2]
            and kbuf.shape[:2] == self.keys.shape[:2]
            and self.keys.data_ptr() == kbuf.data_ptr()  # still backed by it (compaction, reordering replace keys)
            and self.values.data_ptr() == vbuf.data_ptr()
        )
        if not fits:
            B, H, _, dk = self.keys.shape
            cap = T + new + self.GROW
            kbuf = self.keys.new_empty(B, H, cap, dk)
            vbuf = self.values.new_empty(B, H, cap, self.values.shape[-1])
            kbuf[:, :, :T] = self.keys
            vbuf[:, :, :T] = self.values
            self._kbuf, self._vbuf = kbuf, vbuf
        kbuf[:, :, T : T + new] = key_states
        vbuf[:, :, T : T + new] = value_states
        self.keys, self.values = kbuf[:, :, : T + new], vbuf[:, :, : T + new]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen + self.hidden

    def splice(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Start from a whole prompt's keys and values [B, Hk, n, d] (image reuse), before any update."""
        init_layer(self, keys, values)
        self.keys, self.values = keys.contiguous(), values.contiguous()
        self.seen = keys.shape[-2]

    @property
    def compacted(self) -> bool:
        return self.positions is not None

    def kv_nbytes(self) -> int:
        """Bytes of keys and values held (a quantized layer: codes, scales, zero points, group indices too)."""
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def full_slot_bytes(self) -> int:
        """Bytes one slot of one head takes in full precision (what an uncompressed cache spends per token)."""
        return self.keys.shape[-1] * self.keys.element_size() + self.values.shape[-1] * self.values.element_size()

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, Hk, T, d] in slot order, as a policy's view shows them."""
        return self.keys, self.values

    @property
    def physical_length(self) -> int:
        return 0 if self.keys is None or self.keys.numel() == 0 else self.keys.shape[-2]

    def slot_positions(self) -> torch.Tensor:
        """[B, Hk, T] original position of every slot."""
        if self.positions is not None:
            return self.positions
        B, H, T = self.keys.shape[:3]
        return torch.arange(T, device=self.keys.device).expand(B, H, T)

    def compact(self, sel: Selection) -> None:
        """Keep the slots `sel.indices` [B, Hk, K] (ascending), with merged keys/values if the policy gave them."""
        idx = sel.indices.to(self.keys.device)
        if sel.keys is not None:
            keys, values = sel.keys.to(self.keys.dtype), sel.values.to(self.values.dtype)
        else:
            keys, values = kernels.gather_kv(self.keys, self.values, idx)
        self.positions = self.slot_positions().gather(-1, idx)
        if sel.filler is not None:  # kept only so every row has the same length: dead from now on
            self.positions = self.positions.masked_fill(sel.filler.to(idx.device), DEAD)
            self.has_dead = True
        for name, t in self.slot_state.items():
            self.slot_state[name] = t.gather(-1, idx)
        # new tensors replace the old ones: the memory of evicted entries is freed once nothing else holds it
        self.keys, self.values = keys.contiguous(), values.contiguous()

    def evict(self, ev: Eviction) -> None:
        """Drop the slots `ev.slots` [B, Hk, E] by moving the surviving entries among the last E slots into the
        holes the others leave, then shortening the layer by E: a few rows move instead of the whole layer being
        copied (`compact`), and the layer stays a view of its append buffer, so the next token appends in place."""
        T, E = self.physical_length, ev.slots.shape[-1]
        dev = self.keys.device
        keep = T - E
        dropped = torch.zeros(self.keys.shape[:3], dtype=torch.bool, device=dev).scatter_(-1, ev.slots.to(dev), True)
        slots = torch.arange(T, device=dev)
        pos, state = self.slot_positions(), self.slot_state
        m = min(E, keep)  # holes (dropped below `keep`) and movers (kept at or above it) pair up one to one
        if m:
            holes = torch.where(dropped[..., :keep], slots[:keep], T).topk(m, dim=-1, largest=False).values
            movers = torch.where(dropped[..., keep:], T, slots[keep:]).topk(m, dim=-1, largest=False).values
            unused = holes == T  # fewer holes than m: those pairs copy the last slot onto itself, which is cut off
            dst, src = holes.masked_fill(unused, T - 1), movers.masked_fill(unused, T - 1)
            for t in (self.keys, self.values):
                d = t.shape[-1]
                t.scatter_(2, dst[..., None].expand(-1, -1, -1, d), t.gather(2, src[..., None].expand(-1, -1, -1, d)))
            # positions and slot state are small: moved out of place (a caller may hold the old tensors)
            pos = pos.scatter(-1, dst, pos.gather(-1, src))
            state = {k: t.scatter(-1, dst, t.gather(-1, src)) for k, t in state.items()}
        self.positions = pos[..., :keep]
        self.slot_state = {k: t[..., :keep] for k, t in state.items()}
        self.keys, self.values = self.keys[:, :, :keep], self.values[:, :, :keep]

    def crop(self, tokens_to_remove: int) -> None:
        if self.compacted:
            raise NotImplementedError("a compressed cache cannot be cropped (assisted decoding is not supported)")
        super().crop(tokens_to_remove)
        self.seen = self.physical_length

    def reset(self) -> None:
        super().reset()
        self._kbuf = self._vbuf = None
        self.seen, self.positions, self.slot_state, self.state, self.has_dead = 0, None, {}, {}, False
        self.hidden, self.incoming = 0, None

    def _batch_op(self, fn) -> None:
        if self.positions is not None:
            self.positions = fn(self.positions)
        self.slot_state = {k: fn(v) for k, v in self.slot_state.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._batch_op(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._batch_op(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._batch_op(lambda t: t[indices, ...])


class CompressedCache(DynamicCache):
    """The cache vlcache compresses. Build it with `session.new_cache()` (or let `generate` get one
    automatically inside `vlcache.compress`); pass it back to `generate` for a chat's next turn."""

    def __init__(self, config):
        super().__init__(config=config)
        if self.layers:
            # only plain full-attention layers become compressible; sliding/chunked ones keep their own logic
            self.layers = [CompressibleLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        else:
            replicate_layers_as(self, CompressibleLayer)
        self.layout: Layout | None = None
        self.seq_valid: torch.Tensor | None = None  # [B, logical] False at padding
        self.padded = False  # any padding at all (if not, slot validity needs no lookup)
        self.prefilled = False
        self.shared: dict = {}  # policy state shared by all layers of the request
        self.request = None  # the policies.view.Request built by the session on first use
        self.query_positions: torch.Tensor | None = None  # image reuse: slots of the recomputed rows
        self.attended: set[int] = set()  # layers whose prompt attention went through vlcache (checked after it)
        # temporal merging: the prompt's layout before it, and where each token the model saw came from
        self.source_layout: Layout | None = None
        self.source_positions: torch.Tensor | None = None  # [B, m] original prompt position of each sequence position
        self.hidden = 0  # prompt tokens dropped before the language model
        # prune_at: the sequence positions kept at the prune layer [B, m'] and which of them are filler (or None)
        self.cut: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.bits: dict[str, int] = {}  # bits per modality once quantized (`quantize`), empty while not
        self.draft = None  # lookahead_draft: the drafting in flight (hf/draft.py), None otherwise
        self.drafted: torch.Tensor | None = None  # lookahead_draft: the [B, g] tokens it drafted
        self.kv_peak = 0  # the most bytes held so far (`note_peak`, during the prefill)
        self.static = None  # static_cache.Frozen while compiled decode holds the layers frozen
        self.decode_room: int | None = None  # inside generate: tokens still to come (the frozen layers' room)

    # ---------------------------------------------------------------- bookkeeping driven by the forward hooks

    def begin(self, layout: Layout, valid: torch.Tensor) -> None:
        """First forward on an empty cache: remember the prompt's layout and padding."""
        if self.get_seq_length() > 0 or self.prefilled:
            raise ValueError("this cache already holds tokens; pass a new cache (session.new_cache()) for a new prompt")
        self.layout = layout
        self.seq_valid = valid.bool()
        self.padded = not bool(self.seq_valid.all())

    def merge(self, keep: torch.Tensor, valid: torch.Tensor) -> None:
        """Temporal merging kept original prompt positions `keep` [B, m] (ascending; `valid` False at the slots a
        row holds only to be as long as the others): from now on the layout, padding and slot positions describe
        that shorter sequence, while `get_seq_length()` still counts every prompt token."""
        if self.layers and any(layer.get_seq_length() for layer in self.layers):
            raise ValueError("temporal merging applies to a prompt's first forward only")
        self.source_layout = self.layout
        self.source_positions = keep
        self.layout = self.layout.select(keep, valid)
        self.seq_valid = self.layout.valid.clone()
        self.padded = not bool(self.seq_valid.all())
        self.hidden = self.source_layout.length - keep.shape[1]
        if not self.layers:
            raise ValueError("temporal merging needs a cache built with the model's config (session.new_cache())")
        for layer in self.layers:
            if not isinstance(layer, CompressibleLayer):
                raise ValueError(
                    "temporal merging needs full-attention layers only (sliding-window layers count tokens)"
                )
            layer.hidden = self.hidden

    def original_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Slot positions (in the sequence the model saw) -> positions in the prompt as given (the same without
        temporal merging); generated tokens follow the prompt, filler slots stay DEAD."""
        if self.source_positions is None:
            return positions
        src = self.source_positions.to(positions.device)
        m = src.shape[1]
        flat = positions.flatten(1)
        inside = src.gather(1, flat.clamp(0, m - 1))
        out = torch.where(flat >= m, flat + self.hidden, inside)
        return out.masked_fill(flat == DEAD, DEAD).view_as(positions)

    def extend(self, valid: torch.Tensor) -> None:
        """A later forward appends tokens; `valid` [B, q] marks which are real (not padding)."""
        valid = valid.to(self.seq_valid.device).bool()
        self.seq_valid = torch.cat([self.seq_valid, valid], dim=-1)
        if self.static is not None:  # frozen: the step's token validity goes to the device, padding is read at thaw
            self.static.step_valid.copy_(valid[:, -1])
            return
        self.padded = self.padded or not bool(valid.all())

    def compressible(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, CompressibleLayer)]

    def slot_valid(self, layer: CompressibleLayer) -> torch.Tensor:
        """[B, Hk, T] whether each slot holds a real token (False at padding)."""
        pos = layer.slot_positions()
        if not self.padded and not layer.has_dead:
            return torch.ones(1, 1, 1, dtype=torch.bool, device=pos.device).expand(pos.shape)
        sv = self.seq_valid.to(pos.device)
        return sv.gather(1, pos.clamp(min=0).flatten(1)).view_as(pos) & (pos != DEAD)

    def physical_length(self, layer_idx: int) -> int:
        layer = self.layers[layer_idx]
        return layer.physical_length if isinstance(layer, CompressibleLayer) else layer.keys.shape[-2]

    def note_peak(self) -> None:
        """Remember the bytes held now if they are the most so far (the session calls it in each prefill layer, while
        that layer holds its whole prompt; afterwards the cache only grows by the generated tokens)."""
        self.kv_peak = max(self.kv_peak, self.nbytes())

    def nbytes(self) -> int:
        """Bytes the cache holds now (keys and values of every layer; scales and group indices of quantized ones)."""
        return sum(_layer_nbytes(layer) for layer in self.layers if getattr(layer, "keys", None) is not None)

    def quantize(self, policy) -> None:
        """Quantize every compressible layer's kept entries at the policy's bits (right after the prefill)."""
        from ..quant.config import QuantConfig, resolve_group
        from .quantized import QuantizedLayer

        for i, layer in enumerate(self.layers):
            if type(layer) is not CompressibleLayer or layer.physical_length == 0:
                continue
            config = QuantConfig.of(policy, layer.keys.shape[-1])
            resolve_group(config.group, layer.values.shape[-1])
            pos = layer.slot_positions()
            n = self.layout.length
            inside = (pos >= 0) & (pos < n)
            vision = self.layout.vision.to(pos.device).gather(1, pos.clamp(0, n - 1).flatten(1)).view_as(pos) & inside
            self.layers[i] = QuantizedLayer.from_layer(
                layer, vision, self.slot_valid(layer), config, self.position_valid
            )
        self.bits = {"vision": policy.vision_bits, "text": policy.text_bits}

    def position_valid(self, positions: torch.Tensor, maybe_dead: bool = True) -> torch.Tensor | None:
        """[B, Hk, N] whether slots at these positions hold real tokens, or None when all do (no padding, and no
        dead slot if `maybe_dead` is False)."""
        if not self.padded and not maybe_dead:
            return None
        sv = self.seq_valid.to(positions.device)
        return sv.gather(1, positions.clamp(min=0).flatten(1)).view_as(positions) & (positions != DEAD)

    def stats(self, policy: str = "", row: int | None = None) -> CompressionStats:
        """Tokens kept per layer and modality, and KV bytes, as of now; for one batch row if `row` is given."""
        total = self._stats(policy)
        return total if row is None else self.row_stats(total, self.kept_positions(), row)

    def _stats(self, policy: str) -> CompressionStats:
        layout = self.source_layout or self.layout
        prompt = {"text": 0, "image": 0, "video": 0} if layout is None else layout.counts()
        out = CompressionStats(policy=policy, batch=0 if layout is None else layout.batch_size, prompt=prompt)
        if self.source_layout is not None:  # what temporal merging dropped before the model, per modality
            out.merged = _merged(prompt, self.layout.counts())
        full = 0
        for i, layer in enumerate(self.layers):
            if getattr(layer, "keys", None) is None:
                continue
            if (layer.physical_length if isinstance(layer, CompressibleLayer) else layer.keys.numel()) == 0:
                continue
            nbytes = _layer_nbytes(layer)
            if not isinstance(layer, CompressibleLayer):
                full += nbytes
                continue
            B, H = layer.keys.shape[:2]
            T = layer.physical_length
            full += B * H * layer.get_seq_length() * layer.full_slot_bytes()
            kept = self._kept_by_modality(layer.slot_positions(), self.slot_valid(layer))
            out.layers.append(LayerStats(i, layer.get_seq_length(), T, kept, nbytes))
            if hasattr(layer, "bytes_by_kind"):
                for kind, b in layer.bytes_by_kind().items():
                    out.kv_bytes_by_kind[kind] = out.kv_bytes_by_kind.get(kind, 0) + b
        out.kv_bytes = self.nbytes()
        out.kv_bytes_full = full
        out.kv_bytes_peak = max(self.kv_peak, out.kv_bytes)
        out.bits = dict(self.bits)
        return out

    def kept_positions(self) -> dict[int, torch.Tensor]:
        """layer -> [B, Hk, T] the slot positions of every compressible layer, as of now. References, not copies:
        a layer replaces its positions tensor whenever they change and never writes into it, so these keep
        describing this moment after later steps (what `row_stats` counts from)."""
        return {i: self.layers[i].slot_positions() for i in self.compressible()}

    def row_stats(self, total: CompressionStats, positions: dict[int, torch.Tensor], row: int) -> CompressionStats:
        """One batch row's part of `total` (what `stats()` gave at some moment), its kept tokens counted at that
        moment's `positions` (`kept_positions()`): the same at any later time, since the layout and the padding
        of the positions already cached never change. Every row holds the same number of slots, so a row's bytes
        are an equal share of the whole (every count below has the batch as a factor)."""
        layout = self.source_layout or self.layout
        share = max(1, total.batch)
        out = CompressionStats(policy=total.policy, batch=1, prompt=_row_counts(layout, row), bits=dict(total.bits))
        if self.source_layout is not None:
            out.merged = _merged(out.prompt, _row_counts(self.layout, row))
        for s in total.layers:
            pos = positions[s.layer]
            kept = self._kept_by_modality(pos, self.position_valid(pos), row)
            out.layers.append(LayerStats(s.layer, s.seen, s.slots, kept, s.nbytes // share))
        out.kv_bytes = total.kv_bytes // share
        out.kv_bytes_full = total.kv_bytes_full // share
        out.kv_bytes_peak = total.kv_bytes_peak // share
        out.kv_bytes_by_kind = {kind: b // share for kind, b in total.kv_bytes_by_kind.items()}
        return out

    def _kept_by_modality(self, pos: torch.Tensor, real: torch.Tensor, row: int | None = None) -> dict[str, float]:
        """Real tokens among slots at positions `pos` [B, Hk, T] (`real`: which hold one), per modality, averaged
        over KV heads; one batch row's if `row` is given."""
        H = pos.shape[1]
        if row is not None:
            keep_row = torch.zeros(pos.shape[0], 1, 1, dtype=torch.bool, device=pos.device)
            keep_row[row] = True
            real = real & keep_row
        n = self.layout.length
        in_prompt = pos < n
        mod = self.layout.modality.to(pos.device).long().gather(1, pos.clamp(0, n - 1).flatten(1)).view_as(pos)
        kept = {
            name: float(((mod == m) & in_prompt & real).sum()) / H for m, name in enumerate(("text", "image", "video"))
        }
        kept["generated"] = float((~in_prompt & real).sum()) / H
        return kept


def _layer_nbytes(layer) -> int:
    if isinstance(layer, CompressibleLayer):
        return layer.kv_nbytes()
    return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()


def _row_counts(layout: Layout, row: int) -> dict[str, int]:
    v, m = layout.valid[row], layout.modality[row]
    return {name: int(((m == k) & v).sum()) for k, name in enumerate(("text", "image", "video"))}


def _merged(prompt: dict[str, int], seen: dict[str, int]) -> dict[str, int]:
    return {k: prompt[k] - seen[k] for k in ("image", "video") if prompt[k] - seen[k]}
