"""KV quantization per modality (KIVI's quantizer, VidKV's per-channel values): packed codes, group scales, the
settings' checks. Pure PyTorch; the quantized cache layer is in `vlcache.hf.quantized`, the fused decode attention
in `vlcache.kernels`."""

from .config import SETTING_BITS, QuantConfig, check_bits, check_settings, resolve_group
from .tensor import KVPart, Quantized, dequantize, pack, quantize, unpack

__all__ = [
    "KVPart",
    "QuantConfig",
    "Quantized",
    "SETTING_BITS",
    "check_bits",
    "check_settings",
    "dequantize",
    "pack",
    "quantize",
    "resolve_group",
    "unpack",
]
