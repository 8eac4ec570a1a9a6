"""A cache layer whose kept entries are quantized per modality, with a full-precision window of recent tokens.

Built from a compressed layer right after the prefill (selection and merging done): its valid slots go into
segments, one per modality (vision, text), each quantized at that modality's bits (`vlcache.quant`: keys per
channel over groups of G slots, values per slot over groups of G channels, or per channel); a 16-bit modality stays
as it is. Padding and filler slots carry nothing and are dropped; where heads or batch rows keep different numbers
of a modality, the shorter ones fill up with dead slots (position DEAD, masked, counted in the bytes). Generated
tokens enter the window in full precision; once it holds `residual` + G of them, the oldest G are quantized as one
group (text bits) into a "generated" segment, so the `residual` most recent tokens are always in full precision.

Decode attention does not depend on the order of the past keys, so the layer stores its slots in that physical
order (segments, then the window) and computes its attention itself (`attend`: dequantized on the fly, see
`kernels.quantized_attention`). Policies see a logical order: the slots sorted by position (dead ones first), the
order an uncompressed layer keeps. `positions`, `slot_state` and the indices of a `Selection` or `Eviction` are in
that order; `perm` maps it to the physical one. Decode-time evictions gather the survivors' codes (each slot then
remembers its scale group: `Quantized.index`), so evicting frees memory as it does in full precision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from .. import kernels
from ..policies.view import Eviction, Selection
from ..quant.config import QuantConfig
from ..quant.tensor import KVPart, Quantized, dequantize, quantize
from .cache import DEAD, CompressibleLayer


@dataclass
class Part:
    """A physical run of slots: keys / values [B, Hk, N, d] (quantized, or plain), their positions [B, Hk, N]
    (DEAD at fillers) and validity [B, Hk, N] (None: all valid; only for segments, whose validity never changes)."""

    modality: str  # "vision", "text", "generated" or "window"
    keys: Quantized | torch.Tensor
    values: Quantized | torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor | None = None

    @property
    def slots(self) -> int:
        return self.positions.shape[-1]

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for t in (self.keys, self.values):
            out += t.tensors() if isinstance(t, Quantized) else [t]
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def dense(self, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys, self.values
        return (
            dequantize(k, dtype) if isinstance(k, Quantized) else k,
            dequantize(v, dtype) if isinstance(v, Quantized) else v,
        )

    def gather(self, idx: torch.Tensor, filler: torch.Tensor) -> Part:
        """Keep slots idx [B, Hk, K]; `filler` [B, Hk, K] marks those kept only so that every row has K (dead)."""

        def take(t):
            if isinstance(t, Quantized):
                return t.gather(idx)
            return t.gather(2, idx[..., None].expand(*idx.shape, t.shape[-1]))

        valid = ~filler if self.valid is None else self.valid.gather(-1, idx) & ~filler
        positions = self.positions.gather(-1, idx).masked_fill(filler, DEAD)
        return Part(self.modality, take(self.keys), take(self.values), positions, _none_if_all(valid))


def _none_if_all(valid: torch.Tensor) -> torch.Tensor | None:
    return None if bool(valid.all()) else valid


def _take(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx [B, Hk, N], filler [B, Hk, N]) with N the most True of any row and head: each row's True slots in
    order, then as many of its other slots as it needs to reach N (fillers)."""
    T = mask.shape[-1]
    N = int(mask.sum(-1).max()) if mask.numel() else 0
    order = ((~mask).long() * T + torch.arange(T, device=mask.device)).argsort(-1)[..., :N]
    return order, ~mask.gather(-1, order)


def _cat(a, b):
    """Two runs of slots of one kind, one after the other (along N)."""
    if not isinstance(a, Quantized):
        return torch.cat([a, b], dim=2)
    if a.axis == "token":
        return Quantized(
            torch.cat([a.codes, b.codes], 2),
            torch.cat([a.scale, b.scale], 2),
            torch.cat([a.zero, b.zero], 2),
            a.bits,
            a.group,
            "token",
        )
    index = None
    if a.index is not None or b.index is not None or a.slots % a.group:  # slot // group no longer holds
        index = torch.cat([a.group_index(), b.group_index() + a.scale.shape[2]], -1).to(torch.int16)
    return Quantized(
        torch.cat([a.codes, b.codes], 2),
        torch.cat([a.scale, b.scale], 2),
        torch.cat([a.zero, b.zero], 2),
        a.bits,
        a.group,
        "channel",
        index,
    )


class QuantizedLayer(CompressibleLayer):
    """See the module docstring. Build with `QuantizedLayer.from_layer`; `keys` / `values` are the window's (what
    transformers' code may look at), the whole layer is `dense()` (dequantized, logical order)."""

    @classmethod
    def from_layer(
        cls,
        layer: CompressibleLayer,
        vision: torch.Tensor,
        valid: torch.Tensor,
        config: QuantConfig,
        valid_of: Callable[[torch.Tensor, bool], torch.Tensor | None],
    ) -> QuantizedLayer:
        """Quantize a compressed layer. vision / valid [B, Hk, T]: which of its slots hold vision tokens, which real
        tokens. `valid_of(positions, maybe_dead)`: the cache's validity of slot positions (None: all valid)."""
        self = cls()
        self.seen, self.hidden = layer.seen, layer.hidden
        self.state, self.slot_state = layer.state, layer.slot_state
        self.is_initialized, self.device = True, layer.keys.device
        self.dtype = layer.keys.dtype
        self.config, self.valid_of = config, valid_of
        keys, values, pos = layer.keys, layer.values, layer.slot_positions()
        self.slot_bytes = keys.shape[-1] * keys.element_size() + values.shape[-1] * values.element_size()
        parts, srcs = [], []
        for modality, mask in (("vision", valid & vision), ("text", valid & ~vision)):
            idx, filler = _take(mask)
            if idx.shape[-1] == 0:
                continue
            k = keys.gather(2, idx[..., None].expand(*idx.shape, keys.shape[-1]))
            v = values.gather(2, idx[..., None].expand(*idx.shape, values.shape[-1]))
            ok = ~filler
            bits = config.bits(modality)
            if bits < 16:
                k = quantize(k, bits, config.group, "channel", ok)
                v = quantize(v, bits, config.group, config.value_axis, ok)
            parts.append(Part(modality, k, v, pos.gather(-1, idx).masked_fill(filler, DEAD), _none_if_all(ok)))
            srcs.append(idx)
        B, H, _, d = keys.shape
        empty = pos.new_zeros(B, H, 0)
        window = Part("window", keys.new_zeros(B, H, 0, d), values.new_zeros(B, H, 0, values.shape[-1]), empty)
        self.perm = torch.arange(pos.shape[-1], device=pos.device).expand(B, H, -1)  # the old layer's order
        self._relayout(parts, window, torch.cat(srcs + [empty], -1))
        return self

    # ------------------------------------------------------------------ layout

    @property
    def physical_length(self) -> int:
        return self.perm.shape[-1]

    def slot_positions(self) -> torch.Tensor:
        return self.positions

    def _relayout(self, parts: list[Part], window: Part, src: torch.Tensor) -> None:
        """Adopt new physical parts. src [B, Hk, T'] is the old physical slot of every new one (-1: a new token);
        the logical order becomes the new positions sorted, and per-slot policy state follows its slots."""
        inverse = self.perm.argsort(-1)  # old physical -> old logical
        pos = torch.cat([p.positions for p in parts] + [window.positions], -1)
        perm = pos.argsort(dim=-1, stable=True)
        src = src.gather(-1, perm)
        old = torch.where(src >= 0, inverse.gather(-1, src.clamp(min=0)), -1)
        for name, t in self.slot_state.items():
            # per KV head, or per query head (lookahead's waiting sums): each query head follows its KV head's slots
            idx = old if t.shape[1] == old.shape[1] else old.repeat_interleave(t.shape[1] // old.shape[1], dim=1)
            self.slot_state[name] = torch.where(idx >= 0, t.gather(-1, idx.clamp(min=0)), 0)
        self.parts, self.window, self.perm, self.positions = parts, window, perm, pos.gather(-1, perm)
        self.has_dead = bool((pos == DEAD).any())
        self.keys, self.values = window.keys, window.values

    def _offsets(self) -> list[int]:
        out, off = [], 0
        for p in [*self.parts, self.window]:
            out.append(off)
            off += p.slots
        return out

    def _keep(self, keep: torch.Tensor) -> None:
        """Keep the physical slots `keep` [B, Hk, T] marks."""
        new, srcs = [], []
        offsets = self._offsets()
        for part, off in zip([*self.parts, self.window], offsets):
            m = keep[..., off : off + part.slots]
            if bool(m.all()):
                new.append(part)
                srcs.append(torch.arange(off, off + part.slots, device=m.device).expand(m.shape))
                continue
            idx, filler = _take(m)
            if idx.shape[-1] == 0 and part.modality != "window":
                continue
            new.append(part.gather(idx, filler))
            srcs.append(idx + off)
        self._relayout(new[:-1], new[-1], torch.cat(srcs, -1))

    def compact(self, sel: Selection) -> None:
        """Keep the logical slots `sel.indices` [B, Hk, K]; its filler slots are dropped (the parts fill up their
        own rows)."""
        if sel.keys is not None:
            raise ValueError("a quantized layer cannot take merged keys/values (merging happens before quantization)")
        idx = sel.indices.to(self.perm.device)
        phys = self.perm.gather(-1, idx)
        keep = torch.zeros(self.perm.shape, dtype=torch.bool, device=idx.device)
        kept = torch.ones_like(idx, dtype=torch.bool) if sel.filler is None else ~sel.filler.to(idx.device)
        self._keep(keep.scatter_(-1, phys, kept))

    def evict(self, ev: Eviction) -> None:
        phys = self.perm.gather(-1, ev.slots.to(self.perm.device))
        self._keep(torch.ones(self.perm.shape, dtype=torch.bool, device=phys.device).scatter_(-1, phys, False))

    # ------------------------------------------------------------------ decode

    def update(self, key_states, value_states, *args, **kwargs):
        if self.fill_at is not None or self.incoming is not None:
            raise ValueError("a quantized layer takes appended tokens only (it is built after the prefill)")
        self._roll()
        w, new = self.window, key_states.shape[-2]
        B, H = key_states.shape[:2]
        start, self.seen = self.seen, self.seen + new
        fresh = torch.arange(start, start + new, device=self.perm.device).expand(B, H, new)
        T = self.physical_length
        self.window = Part(
            "window",
            torch.cat([w.keys, key_states.to(w.keys.dtype)], 2),
            torch.cat([w.values, value_states.to(w.values.dtype)], 2),
            torch.cat([w.positions, fresh], -1),
        )
        # the newest tokens are last in both orders: no re-sort
        self.perm = torch.cat([self.perm, torch.arange(T, T + new, device=self.perm.device).expand(B, H, new)], -1)
        self.positions = torch.cat([self.positions, fresh], -1)
        for name, t in self.slot_state.items():
            self.slot_state[name] = torch.cat([t, t.new_zeros(*t.shape[:-1], new)], dim=-1)
        self.keys, self.values = self.window.keys, self.window.values
        return self.keys, self.values

    def _roll(self) -> None:
        """While the window holds `residual` + G tokens or more, quantize its oldest G as one group."""
        cfg = self.config
        if cfg.text_bits == 16:
            return
        G = cfg.group
        while self.window.slots >= cfg.residual + G:
            w = self.window
            ok = self.valid_of(w.positions[..., :G], self.has_dead)
            ok = torch.ones_like(w.positions[..., :G], dtype=torch.bool) if ok is None else ok
            k = quantize(w.keys[:, :, :G], cfg.text_bits, G, "channel", ok)
            v = quantize(w.values[:, :, :G], cfg.text_bits, G, cfg.value_axis, ok)
            group = Part("generated", k, v, w.positions[..., :G], _none_if_all(ok))
            offsets = self._offsets()
            parts, srcs = [], []
            for part, off in zip(self.parts, offsets):
                if part.modality != "generated":
                    parts.append(part)
                    srcs.append(self._range(off, part))
            old = next((p for p in self.parts if p.modality == "generated"), None)
            win_off = offsets[-1]
            moved = torch.arange(win_off, win_off + G, device=ok.device).expand(ok.shape)
            if old is not None:
                off = offsets[self.parts.index(old)]
                valid = None
                if old.valid is not None or group.valid is not None:
                    valid = torch.cat([_all(old), _all(group)], -1)
                group = Part(
                    "generated",
                    _cat(old.keys, k),
                    _cat(old.values, v),
                    torch.cat([old.positions, group.positions], -1),
                    valid,
                )
                moved = torch.cat([self._range(off, old), moved], -1)
            parts.append(group)
            srcs.append(moved)
            rest = Part("window", w.keys[:, :, G:], w.values[:, :, G:], w.positions[..., G:])
            srcs.append(torch.arange(win_off + G, win_off + w.slots, device=ok.device).expand(rest.positions.shape))
            self._relayout(parts, rest, torch.cat(srcs, -1))

    def _range(self, off: int, part: Part) -> torch.Tensor:
        return torch.arange(off, off + part.slots, device=part.positions.device).expand(part.positions.shape)

    def attend(self, query: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of this forward's query rows [B, H, q, d] (the last q slots of the window) over the layer:
        [B, H, q, d]. Segments are visible to every row (they hold older tokens), the window causally."""
        q, w = query.shape[2], self.window
        parts = [KVPart(p.keys, p.values, None if p.valid is None else p.valid[:, :, None]) for p in self.parts]
        visible = self.valid_of(w.positions, self.has_dead)
        if q > 1:
            n = w.slots
            causal = (
                torch.arange(n, device=query.device)[None, :] <= torch.arange(n - q, n, device=query.device)[:, None]
            )
            visible = causal[None, None] if visible is None else causal[None, None] & visible[:, :, None]
        elif visible is not None:
            visible = visible[:, :, None]
        parts.append(KVPart(w.keys, w.values, visible))
        return kernels.quantized_attention(query, parts, scale)

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole layer dequantized, in logical order: keys, values [B, Hk, T, d] (what a policy's view shows)."""
        ks, vs = zip(*[p.dense(self.dtype) for p in [*self.parts, self.window]])
        k, v = torch.cat(ks, 2), torch.cat(vs, 2)
        idx = self.perm[..., None]
        return k.gather(2, idx.expand(*self.perm.shape, k.shape[-1])), v.gather(
            2, idx.expand(*self.perm.shape, v.shape[-1])
        )

    # ------------------------------------------------------------------ bytes and the rest of the layer API

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor that holds keys or values (codes, scales, zero points, group indices, plain entries)."""
        return [t for p in [*self.parts, self.window] for t in p.tensors()]

    def kv_nbytes(self) -> int:
        return sum(p.nbytes for p in [*self.parts, self.window])

    def full_slot_bytes(self) -> int:
        return self.slot_bytes

    def bytes_by_kind(self) -> dict[str, int]:
        """{"codes", "scales" (scales, zero points and group indices), "full" (16-bit entries and the window)}."""
        out = {"codes": 0, "scales": 0, "full": 0}
        for p in [*self.parts, self.window]:
            for t in (p.keys, p.values):
                if isinstance(t, Quantized):
                    out["codes"] += t.codes.numel() * t.codes.element_size()
                    out["scales"] += t.nbytes - t.codes.numel() * t.codes.element_size()
                else:
                    out["full"] += t.numel() * t.element_size()
        return out

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized cache cannot be cropped (assisted decoding is not supported)")

    def reset(self) -> None:
        # a request's cache is built once and thrown away (session.new_cache()); going back to an empty, unquantized
        # layer would need the prefill machinery this layer no longer has
        raise NotImplementedError("a quantized layer cannot be reset: start a new request with session.new_cache()")

    def _batch_op(self, fn) -> None:
        def over(p: Part) -> Part:
            def t(x):
                if isinstance(x, Quantized):
                    return replace(
                        x,
                        codes=fn(x.codes),
                        scale=fn(x.scale),
                        zero=fn(x.zero),
                        index=None if x.index is None else fn(x.index),
                    )
                return fn(x)

            return Part(p.modality, t(p.keys), t(p.values), fn(p.positions), None if p.valid is None else fn(p.valid))

        self.parts, self.window = [over(p) for p in self.parts], over(self.window)
        self.perm, self.positions = fn(self.perm), fn(self.positions)
        self.slot_state = {k: fn(v) for k, v in self.slot_state.items()}
        self.keys, self.values = self.window.keys, self.window.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_op(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_op(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_op(lambda t: t[indices, ...])


def _all(part: Part) -> torch.Tensor:
    return torch.ones_like(part.positions, dtype=torch.bool) if part.valid is None else part.valid
