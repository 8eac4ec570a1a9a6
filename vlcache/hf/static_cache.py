"""Static-capacity decode: a compressed cache frozen into fixed-size buffers for the steps after the prompt.

A decode step over a `CompressedCache` appends one slot per layer, so every layer's key length changes every step:
each step is a new shape, which neither a compiled graph nor a CUDA graph can replay. Frozen, a layer holds keys and
values [B, Hk, C, d] of fixed capacity C (the kept count plus the tokens still to come, rounded up), each slot's
position and validity [B, Hk, C] (DEAD and False past the filled part), and the next slot and the next position as
0-dim device tensors. A step writes in place at that slot and masks by validity, so neither a shape nor a host value
changes between steps, and nothing is read back to the host: the host's own counts (`filled`, `seen`) move by one
per step, in step with the device's, without looking. The capacity is a dynamic dim of the compiled step, so one
compile serves every prompt length and budget (CUDA graphs are still recorded per capacity: rounded, few).

The layer it froze (`inner`) stays inside: `settle` points it at the buffers (views, no copy), so a policy's eager
eviction between steps and the stats at the end see an ordinary `CompressibleLayer`; `refreeze` takes back what an
eviction left. Sliding-window layers (Gemma 3) are frozen too, masked by position instead of by a running count, and
rebuilt as the stock layer at `thaw`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import kernels
from .cache import DEAD, CompressedCache, CompressibleLayer
from .compat import require, restore_sliding, sliding_state

DynamicLayer = require("DynamicLayer")

ROUND = 64  # capacities are rounded up to this many slots, so nearby sizes share one compiled graph


def capacity(kept: int, room: int) -> int:
    return -(-(kept + room) // ROUND) * ROUND


class StaticLayer(DynamicLayer):
    """One decoder layer frozen for decode (see the module docstring). `keys` / `values` are the whole buffers."""

    def __init__(self, inner, cap: int, positions, valid, seen: int, window: int | None, step_valid):
        super().__init__()
        k, v = inner.keys, inner.values
        B, H, T, _ = k.shape
        if cap < T + 1:
            raise ValueError(f"static capacity {cap} leaves no room after the {T} slots held")
        self.inner, self.window, self.capacity = inner, window, cap
        self.keys = k.new_zeros(B, H, cap, k.shape[-1])
        self.values = v.new_zeros(B, H, cap, v.shape[-1])
        self.keys[:, :, :T], self.values[:, :, :T] = k, v
        self.pos = torch.full((B, H, cap), DEAD, dtype=torch.long, device=k.device)
        self.pos[..., :T] = positions
        self.valid = torch.zeros(B, H, cap, dtype=torch.bool, device=k.device)
        self.valid[..., :T] = valid
        self.slot = torch.tensor(T, device=k.device)  # next slot written
        self.next_pos = torch.tensor(seen, device=k.device)  # sequence position of the next token
        self.step_valid = step_valid  # [B] whether the step's token is real (the cache's, shared by all layers)
        self.filled, self.seen = T, seen  # the host's counts, moved by `advance`, never read from the device
        self.rows = None  # [B, Hq, r, d] the last r steps' queries, for a policy's eviction between steps
        self.row = torch.tensor(0, device=k.device)
        self.mass = self.mass_last = None  # [B, Hk, C] attention mass since the last eviction / of the last step
        self.dtype, self.device, self.is_initialized = k.dtype, k.device, True
        self.fused = kernels.backend(k.device) == "triton"  # attention by the decode kernel (see `attend`)
        # the inner layer lets go of its own tensors (views of the buffers from now on): the cache is held once
        if isinstance(inner, CompressibleLayer):
            self.settle()
        else:
            inner.keys, inner.values = self.keys[:, :, :0], self.values[:, :, :0]

    def buffers(self) -> list[torch.Tensor]:
        out = [self.keys, self.values, self.pos, self.valid, self.slot, self.next_pos, self.row]
        return out + [t for t in (self.rows, self.mass, self.mass_last) if t is not None]

    def sized(self) -> list[torch.Tensor]:
        """The buffers whose dim 2 is the capacity (or, for the kept query rows, the steps between evictions)."""
        out = [t for t in (self.keys, self.values, self.pos, self.valid, self.mass, self.mass_last) if t is not None]
        return out + ([self.rows] if self.rows is not None and self.rows.shape[2] > 1 else [])

    # ---------------------------------------------------------------- inside the step (no host sync, fixed shapes)

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[-2] != 1:
            raise ValueError("a frozen (compiled-decode) cache takes one new token per step")
        B, H = self.pos.shape[:2]
        at = self.slot.view(1)
        self.keys.index_copy_(2, at, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, at, value_states.to(self.values.dtype))
        self.pos.index_copy_(2, at, self.next_pos.view(1, 1, 1).expand(B, H, 1))
        self.valid.index_copy_(2, at, self.step_valid.view(B, 1, 1).expand(B, H, 1))
        self.slot.add_(1)
        self.next_pos.add_(1)
        return self.keys, self.values

    def visible(self) -> torch.Tensor:
        """[B, Hk, C] the slots the step's token attends to (after `update`)."""
        if self.window is None:
            return self.valid
        # the stock sliding mask: key position > query position - window (the new token sits at next_pos - 1)
        return self.valid & (self.pos > self.next_pos - 1 - self.window)

    def keep_query(self, query: torch.Tensor) -> None:
        if self.rows is not None:
            self.rows.index_copy_(2, self.row.view(1), query.to(self.rows.dtype))
            self.row.add_(1)

    # ---------------------------------------------------------------- on the host, between steps

    def advance(self) -> None:
        self.filled += 1
        self.seen += 1

    def get_seq_length(self) -> int:
        return self.seen + getattr(self.inner, "hidden", 0)

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def settle(self, length: int | None = None):
        """The frozen layer as it stood with `length` slots filled (default: now), its tensors views of the
        buffers; slot state zero-extended as the dynamic cache's appends would have done."""
        T = self.filled if length is None else length
        inner = self.inner
        if not isinstance(inner, CompressibleLayer):
            return inner
        inner.keys, inner.values = self.keys[:, :, :T], self.values[:, :, :T]
        inner._kbuf, inner._vbuf = self.keys, self.values
        inner.positions = self.pos[..., :T]
        inner.seen = self.seen - (self.filled - T)
        for name, t in inner.slot_state.items():
            if t.shape[-1] < T:
                inner.slot_state[name] = torch.cat([t, t.new_zeros(*t.shape[:-1], T - t.shape[-1])], dim=-1)
        return inner

    def refreeze(self, cache: CompressedCache) -> None:
        """Take back the inner layer after an eviction between steps (it may hold fewer slots, moved)."""
        inner = self.inner
        K = inner.physical_length
        if inner.keys.data_ptr() != self.keys.data_ptr():  # compacted into new tensors (evicting in place keeps them)
            self.keys[:, :, :K] = inner.keys
            self.values[:, :, :K] = inner.values
        self.pos[..., :K] = inner.slot_positions()
        self.pos[..., K:] = DEAD
        self.valid[..., :K] = cache.slot_valid(inner)
        self.valid[..., K:] = False
        self.slot.fill_(K)
        self.filled = K
        self.settle()

    def thawed(self):
        """The layer to put back when decoding ends."""
        if isinstance(self.inner, CompressibleLayer):
            inner = self.settle()
            inner.positions = inner.positions.clone()  # callers may keep it: the buffer is not theirs to change
            return inner
        window, _ = sliding_state(self.inner)
        T = self.filled
        start = max(0, T - (window - 1))
        restore_sliding(self.inner, self.keys[:, :, start:T], self.values[:, :, start:T], self.seen)
        return self.inner

    def _frozen(self, *args, **kwargs):
        raise NotImplementedError("compiled decode supports greedy and sampling, not beam search or cropping")

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _frozen


@dataclass
class Frozen:
    """What a cache holds while frozen: the step token's validity, the dummy 4-D mask handed to the language model
    (vlcache's attention masks every frozen layer itself; a 4-D mask makes transformers build none), the steps
    since the freeze or the policy's last eviction (their query rows are kept), and the count of them at which the
    next eviction is due (`evict_every`, less what the policy took in before the freeze)."""

    step_valid: torch.Tensor
    mask: torch.Tensor
    pending: int = 0
    due: int = 0
    layers: list[int] = field(default_factory=list)


def freeze(
    cache: CompressedCache, room: int, heads: int, rows: int = 0, mass: bool = False, managed: set[int] | None = None
) -> None:
    """Freeze every layer of `cache` with room for `room` more tokens; in the layers the policy evicts in
    (`managed`, default all), keep the last `rows` steps' queries (of `heads` query heads) and (with `mass`) the
    attention mass each slot receives, for an eviction between steps."""
    if any(type(layer) is not CompressibleLayer and sliding_state(layer) is None for layer in cache.layers):
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
        raise ValueError(f"compiled decode cannot freeze cache layers of kinds {kinds} (quantized layers are not)")
    first = cache.layers[0].keys
    B = first.shape[0]
    step_valid = torch.ones(B, dtype=torch.bool, device=first.device)
    for i, layer in enumerate(cache.layers):
        T = layer.keys.shape[-2]
        if isinstance(layer, CompressibleLayer):
            positions, valid, seen, window = layer.slot_positions(), cache.slot_valid(layer), layer.seen, None
        else:
            window, seen = sliding_state(layer)
            positions = torch.arange(seen - T, seen, device=first.device).expand(B, layer.keys.shape[1], T)
            valid = cache.position_valid(positions)
        static = StaticLayer(layer, capacity(T, room), positions, valid, seen, window, step_valid)
        if isinstance(layer, CompressibleLayer) and rows and (managed is None or i in managed):
            B, Hk, C, d = static.keys.shape
            static.rows = static.keys.new_zeros(B, heads, rows, d)
            if mass:
                static.mass = torch.zeros(B, Hk, C, device=first.device)
                static.mass_last = torch.zeros(B, Hk, C, device=first.device)
        cache.layers[i] = static
    cache.static = Frozen(step_valid, torch.ones(B, 1, 1, 1, dtype=torch.bool, device=first.device))
    for layer in cache.layers:
        for t in layer.sized():
            # capacities follow the prompt: one graph for every length (a CUDA graph is still recorded per shape,
            # which is cheap), not one compile per length, which costs seconds and soon hits dynamo's limit
            torch._dynamo.maybe_mark_dynamic(t, 2)
        if first.is_cuda:  # CUDA graphs replay fixed addresses: the buffers must never move
            for t in layer.buffers():
                # unguarded (the default from torch 2.10, said here for any other): a guard on each buffer's
                # identity would compile again at every generate, whose freeze makes new buffers
                torch._dynamo.mark_static_address(t, guard=False)


def thaw(cache: CompressedCache) -> None:
    """Put the dynamic layers back (views of the buffers), as they would stand after the same steps unfrozen."""
    if cache.static is None:
        return
    cache.layers = [layer.thawed() if isinstance(layer, StaticLayer) else layer for layer in cache.layers]
    cache.static = None
    cache.padded = cache.padded or not bool(cache.seq_valid.all())  # not checked while frozen (a host sync)


def full(cache: CompressedCache) -> bool:
    """Whether some frozen layer has no slot left for the next token."""
    return any(layer.filled >= layer.capacity for layer in cache.layers if isinstance(layer, StaticLayer))


def attend(layer: StaticLayer, module, query, stock, eager: bool, **kwargs):
    """A decode step's attention over a frozen layer: the decode kernel (split over the keys; with the attention
    mass when the policy reads it) on CUDA, and wherever the mass is read; elsewhere the stock function under the
    layer's own mask. On CUDA the stock path would leave SDPA one program per head, or per query head with the
    keys repeated g times (what transformers does under a compiler when a mask is given): a long cache streamed by
    a few SMs."""
    layer.keep_query(query)
    visible = layer.visible()
    plain = kwargs.get("softcap") is None and kwargs.get("s_aux") is None  # what the kernel computes: softmax(qk)v
    if layer.mass is not None or (layer.fused and plain):
        if not plain:
            raise ValueError("the decode-mass kernel has no logit softcap or attention sinks: compile=False here")
        scaling = kwargs.get("scaling")
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        want = layer.mass is not None
        out, mass = kernels.decode_attention(query, layer.keys, layer.values, visible, scaling, mass=want)
        if want:
            layer.mass.add_(mass)
            layer.mass_last.copy_(mass)
        return out.transpose(1, 2).contiguous(), None
    mask = visible.repeat_interleave(query.shape[1] // visible.shape[1], dim=1)[:, :, None, :]
    if eager:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min
        )
    return stock(module, query, layer.keys, layer.values, mask, **kwargs)
