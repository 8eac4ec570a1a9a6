"""`vlcache caption --kv-memory 8GB`: how many videos of one shape a batch can hold within a KV-cache bound.

Measured, not modelled: the first video of each shape (frame count and frame size, hence one prompt length) is
captioned alone, and its session's `prefill_stats` give the bytes its compressed cache holds (`kv_bytes`) and what
the uncompressed cache of the same prompt would hold (`kv_bytes_full` = tokens x layers x 2 x KV heads x head dim x
dtype size, so every policy's own budget arithmetic, layer-adaptive ones included, is in the number). A video in a
batch then needs the largest of:

- after decoding: kv_bytes + new_tokens x kv_bytes_full / tokens (one slot per layer for every generated token;
  decode-time evictions only make it less);
- during the prefill: a layer's keys and values are whole until that layer is compressed, so kv_bytes plus one
  layer uncompressed (kv_bytes_full / layers; the layers of the supported models are all one size). A policy with
  a whole-model step after the prompt (VL-Cache, CAKE) may hold every layer whole until then: kv_bytes_full;
- with --compare, the full-cache run: kv_bytes_full + the generated tokens.

Videos of one shape are left-padded without padding, so a batch of B needs B times that. Weights and activations
are not counted: leave room for them beside the bound.
"""

from __future__ import annotations

import re

from ..policies import Policy

UNITS = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    UNITS[_p] = UNITS[_p + "ib"] = 1024**_i  # 8G and 8GiB: binary, as ulimit and docker read them
    UNITS[_p + "b"] = 1000**_i  # 8GB: decimal, as disks are sold
SIZE = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes from '8GB' (10^9), '8GiB' or '8G' (2^30), '512MiB', '1.5e9' or a plain byte count; ValueError else."""
    m = SIZE.fullmatch(str(text))
    if m is None or m.group(2).lower() not in UNITS:
        raise ValueError(f"--kv-memory {text!r}: not a size (write 8GB, 8GiB, 512MiB or a number of bytes)")
    value = float(m.group(1)) * UNITS[m.group(2).lower()]
    if not value >= 1:
        raise ValueError(f"--kv-memory {text!r}: must be at least one byte")
    return int(value)


def per_video_bytes(stats, new_tokens: int, policy: Policy, compare: bool) -> int:
    """The KV bytes one video of this shape needs at its peak (see the module docstring). `stats`: the
    prefill `CompressionStats` of that video captioned alone."""
    tokens = max(stats.prompt_tokens, 1)
    full, kept = stats.kv_bytes_full, stats.kv_bytes
    per_token = full / tokens
    decode = kept + new_tokens * per_token
    whole_model_step = type(policy).after_prefill is not Policy.after_prefill
    prefill = full if whole_model_step else min(full, kept + full / max(len(stats.layers), 1))
    need = max(decode, prefill)
    if compare:
        need = max(need, full + new_tokens * per_token)
    return int(need) + 1


def capacity(kv_memory: int, need: int, cap: int) -> int:
    """Videos per batch: as many as fit, at least one (a video larger than the bound still runs, alone), at most
    `cap`."""
    return max(1, min(cap, kv_memory // max(need, 1)))
