"""Group-wise asymmetric quantization of KV tensors, with the codes really packed (KIVI's quantizer).

A tensor x [B, Hk, N, d] (N slots of one KV head, d channels) is split into groups that share a scale s and a zero
point z, and stored as b-bit codes q = clamp(round((x - z) / s), 0, 2^b - 1), read back as x' = q * s + z:

- axis "channel" (keys, and values under VidKV's option): each channel's slots in runs of `group` slots; scale and
  zero [B, Hk, NG, d] with NG = ceil(N / group). Which group a slot belongs to is slot // group until slots are
  dropped (decode-time eviction); from then on `index` [B, Hk, N] (int16) holds it, and the scales stay put.
- axis "token" (values, KIVI): each slot's channels in runs of `group` channels; scale and zero [B, Hk, N, d / group].

Codes are packed along d, lowest bits first: 8-bit one code a byte, 4-bit two, 2-bit four, so `codes` is
[B, Hk, N, d * b / 8] uint8 and `nbytes` is what the memory holds. Scales and zeros are kept in half precision (the
model's dtype when it is fp16 or bf16, else fp16). The zero is rounded down and the scale up in that dtype, and the
codes are computed from the stored values, so every entry comes back within half its group's stored scale:
|x - x'| <= s / 2 (plus fp32 rounding). Slots marked invalid (padding, filler) take no part in a group's range.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (8, 4, 2)  # stored widths; 16 means "not quantized" in the settings
AXES = ("channel", "token")


@dataclass
class Quantized:
    """One quantized tensor [B, Hk, N, d]: see the module docstring for the layout."""

    codes: torch.Tensor  # [B, Hk, N, d * bits / 8] uint8
    scale: torch.Tensor  # [B, Hk, NG, d] (channel) or [B, Hk, N, d / group] (token)
    zero: torch.Tensor  # same shape as scale
    bits: int
    group: int
    axis: str
    index: torch.Tensor | None = None  # [B, Hk, N] int16 group of each slot (axis "channel"), None: slot // group

    @property
    def slots(self) -> int:
        return self.codes.shape[2]

    @property
    def dim(self) -> int:
        return self.codes.shape[3] * 8 // self.bits

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.zero, self.index) if t is not None]

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, scales, zero points and the group index."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def group_index(self) -> torch.Tensor:
        """[B, Hk, N] long: the scale row of every slot (axis "channel")."""
        if self.index is not None:
            return self.index.long()
        B, H, N = self.codes.shape[:3]
        return (torch.arange(N, device=self.codes.device) // self.group).expand(B, H, N)

    def gather(self, idx: torch.Tensor) -> Quantized:
        """Keep the slots idx [B, Hk, K] (in that order). Codes and per-slot scales move with their slots; per-group
        scales stay, and each kept slot remembers its group; groups no slot uses any more are dropped."""
        codes = self.codes.gather(2, idx[..., None].expand(*idx.shape, self.codes.shape[-1]))
        if self.axis == "token":
            w = self.scale.shape[-1]
            take = idx[..., None].expand(*idx.shape, w)
            return Quantized(
                codes, self.scale.gather(2, take), self.zero.gather(2, take), self.bits, self.group, "token"
            )
        index = self.group_index().gather(-1, idx)
        scale, zero = self.scale, self.zero
        used = torch.zeros(scale.shape[2], dtype=torch.bool, device=idx.device)
        used[index.flatten()] = True
        if not bool(used.all()):  # shared by every row and head: a group goes once no slot anywhere uses it
            keep = used.nonzero().flatten()
            remap = torch.cumsum(used.long(), 0) - 1
            scale, zero, index = scale[:, :, keep], zero[:, :, keep], remap[index]
        return Quantized(codes, scale, zero, self.bits, self.group, "channel", index.to(torch.int16))


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision for scales and zeros: the model's own when it is a 16-bit float, else fp16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [..., d] (integers in [0, 2^bits)) -> [..., d * bits / 8] uint8, lowest bits first."""
    per = 8 // bits
    q = q.to(torch.uint8).view(*q.shape[:-1], q.shape[-1] // per, per)
    out = q[..., 0].clone()
    for i in range(1, per):
        out |= q[..., i] << (bits * i)
    return out


def unpack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., d * bits / 8] uint8 -> codes [..., d] uint8 (the inverse of `pack`)."""
    if bits == 8:
        return codes
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(codes >> (bits * i)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).view(*codes.shape[:-1], codes.shape[-1] * per)


_TABLES: dict = {}


def unpack_float(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """`unpack` straight to fp32 through a 256-entry table (byte -> its 8 / bits codes): two operations whatever the
    width, where shifting and masking take three a code (the decode step is bound by the number of operations)."""
    if bits == 8:
        return codes.float()
    key = (bits, codes.device)
    if key not in _TABLES:
        per, mask = 8 // bits, (1 << bits) - 1
        byte = torch.arange(256, device=codes.device)
        _TABLES[key] = torch.stack([(byte >> (bits * i)) & mask for i in range(per)], -1).float()  # [256, per]
    table = _TABLES[key]
    return table[codes.long()].view(*codes.shape[:-1], codes.shape[-1] * table.shape[-1])


def _round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (fp32) in `dtype`, never above x."""
    y = x.to(dtype)
    return torch.where(y.float() > x, torch.nextafter(y, torch.full_like(y, float("-inf"))), y)


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = x.to(dtype)
    return torch.where(y.float() < x, torch.nextafter(y, torch.full_like(y, float("inf"))), y)


def quantize(x: torch.Tensor, bits: int, group: int, axis: str, valid: torch.Tensor | None = None) -> Quantized:
    """x [B, Hk, N, d] -> `Quantized` (module docstring). valid [B, Hk, N]: False slots are left out of the ranges
    (their codes are whatever they round to; they are masked when read). The caller checks `bits`, `group` and
    `axis` (`check_group` in vlcache.quant.config)."""
    B, H, N, d = x.shape
    levels = (1 << bits) - 1
    sdt = scale_dtype(x.dtype)
    xf = x.float()
    ok = torch.ones(B, H, N, dtype=torch.bool, device=x.device) if valid is None else valid
    if axis == "channel":
        ng = -(-N // group)
        pad = ng * group - N
        xg = torch.nn.functional.pad(xf, (0, 0, 0, pad)).view(B, H, ng, group, d)
        okg = torch.nn.functional.pad(ok, (0, pad)).view(B, H, ng, group, 1)
        lo = xg.masked_fill(~okg, float("inf")).amin(3)  # [B, H, NG, d]
        hi = xg.masked_fill(~okg, float("-inf")).amax(3)
    else:
        xg = xf.view(B, H, N, d // group, group)
        okg = ok[..., None, None]
        lo = xg.masked_fill(~okg, float("inf")).amin(-1)  # [B, H, N, d / group]
        hi = xg.masked_fill(~okg, float("-inf")).amax(-1)
    empty = ~torch.isfinite(lo)  # a group without one valid slot: any range will do
    lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    zero = _round_down(lo, sdt)
    step = ((hi - zero.float()) / levels).clamp(min=torch.finfo(sdt).tiny)
    scale = _round_up(step, sdt)
    if axis == "channel":
        s, z = scale.float()[:, :, :, None, :], zero.float()[:, :, :, None, :]
        q = ((xg - z) / s).round().clamp(0, levels).view(B, H, ng * group, d)[:, :, :N]
    else:
        q = ((xg - zero.float()[..., None]) / scale.float()[..., None]).round().clamp(0, levels).view(B, H, N, d)
    return Quantized(pack(q, bits).contiguous(), scale.contiguous(), zero.contiguous(), bits, group, axis)


def dequantize(t: Quantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`Quantized` -> [B, Hk, N, d] in `dtype` (computed in fp32)."""
    q = unpack_float(t.codes, t.bits)
    B, H, N, d = q.shape
    if t.axis == "channel" and t.index is None and N % t.group == 0:  # whole groups: scales broadcast
        ng = N // t.group
        x = q.view(B, H, ng, t.group, d) * t.scale.float()[:, :, :, None] + t.zero.float()[:, :, :, None]
        x = x.view(B, H, N, d)
    elif t.axis == "channel" and t.index is None:  # slot // group: repeat each group's row
        x = (
            q * t.scale.float().repeat_interleave(t.group, 2)[:, :, :N]
            + t.zero.float().repeat_interleave(t.group, 2)[:, :, :N]
        )
    elif t.axis == "channel":
        idx = t.index.long()[..., None].expand(B, H, N, d)
        x = q * t.scale.float().gather(2, idx) + t.zero.float().gather(2, idx)
    else:
        g = t.group
        x = q.view(B, H, N, d // g, g) * t.scale.float()[..., None] + t.zero.float()[..., None]
        x = x.view(B, H, N, d)
    return x.to(dtype)


@dataclass
class KVPart:
    """A run of cached slots attended together: `keys` / `values` [B, Hk, N, d], each quantized or plain, and which
    slots each query row may see, `visible` [B, Hk, 1 or R, N] bool (None: all of them)."""

    keys: Quantized | torch.Tensor
    values: Quantized | torch.Tensor
    visible: torch.Tensor | None = None

    @property
    def slots(self) -> int:
        return self.keys.slots if isinstance(self.keys, Quantized) else self.keys.shape[2]
