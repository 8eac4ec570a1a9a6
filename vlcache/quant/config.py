"""The quantization settings every policy takes, checked once, and the checks that need the model (head dim)."""

from __future__ import annotations

from dataclasses import dataclass

from .tensor import AXES, BITS

SETTING_BITS = (16, *BITS)  # 16: kept as the model computed it
DEFAULT_GROUP = 32  # KIVI's G; smaller head dims use the head dim


def check_bits(name: str, value) -> None:
    if isinstance(value, bool) or value not in SETTING_BITS:
        raise ValueError(
            f"{name} must be one of {', '.join(map(str, SETTING_BITS))} (16 = not quantized), got {value!r}"
        )


def check_settings(group, residual, value_axis) -> None:
    """The settings that do not depend on the model (`check_group` does the rest once the head dim is known)."""
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
        raise ValueError(f"quant_group must be None (32, or the head dim if smaller) or an integer >= 1, got {group!r}")
    if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
        raise ValueError(f"quant_residual must be an integer >= 0 (full-precision recent tokens), got {residual!r}")
    if value_axis not in AXES:
        raise ValueError(f"value_axis must be one of {AXES} ('token': KIVI, 'channel': VidKV), got {value_axis!r}")


def resolve_group(group: int | None, head_dim: int) -> int:
    """The group size for a head dim, raising ValueError naming the valid sizes when `group` does not divide it."""
    if head_dim % 4:
        raise ValueError(
            f"KV quantization packs codes along the head dim, which must be a multiple of 4 (got {head_dim})"
        )
    if group is None:
        return min(DEFAULT_GROUP, head_dim)
    if head_dim % group:
        valid = [g for g in range(1, head_dim + 1) if head_dim % g == 0]
        raise ValueError(
            f"quant_group={group} does not divide the head dim {head_dim}; valid group sizes: "
            f"{', '.join(map(str, valid))} (or None)"
        )
    return group


@dataclass(frozen=True)
class QuantConfig:
    """What a quantized layer needs: bits per modality (generated tokens are text), the group size resolved for the
    head dim, the full-precision window and the value axis."""

    vision_bits: int
    text_bits: int
    group: int
    residual: int
    value_axis: str

    @classmethod
    def of(cls, policy, head_dim: int) -> QuantConfig | None:
        """The policy's settings for a model with this head dim, or None when nothing is quantized."""
        if policy.vision_bits == 16 and policy.text_bits == 16:
            return None
        group = resolve_group(policy.quant_group, head_dim)
        return cls(policy.vision_bits, policy.text_bits, group, policy.quant_residual, policy.value_axis)

    def bits(self, modality: str) -> int:
        return self.vision_bits if modality == "vision" else self.text_bits
