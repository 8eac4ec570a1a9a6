"""vlcache's attention functions, registered with transformers' `AttentionInterface`.

`vlcache_sdpa` and `vlcache_eager` run the stock sdpa / eager attention and, when the module belongs to a model
inside `vlcache.compress`, hand the layer's queries and keys to the session (which scores and compresses) and
build the per-layer mask of a compressed layer. A module outside any session gets the stock function untouched,
so registering them changes nothing for other models.

Masks: transformers builds one mask per forward, sized by the logical cache length. A compressed layer holds
fewer (and per-layer different) entries, so its mask is rebuilt here from the cache's own slot bookkeeping:
every old slot is in the past of the new rows, new slots follow the causal triangle, padding slots are hidden.
"""

from __future__ import annotations

from functools import partial

import torch

from .compat import (
    AttentionInterface,
    AttentionMaskInterface,
    eager_attention_of,
    eager_mask,
    sdpa_attention_forward,
    sdpa_mask,
)

NAMES = {"sdpa": "vlcache_sdpa", "eager": "vlcache_eager"}


def _attend(module, query, key, value, attention_mask, *, base: str, **kwargs):
    stock = sdpa_attention_forward if base == "sdpa" else eager_attention_of(module)
    session = getattr(module, "_vlcache_session", None)
    if session is None or session.cache is None:
        return stock(module, query, key, value, attention_mask, **kwargs)
    return session.attend(module, query, key, value, attention_mask, stock, base == "eager", **kwargs)


def register() -> None:
    """Register the two implementations (idempotent; adds names, replaces nothing)."""
    for base, name in NAMES.items():
        AttentionInterface.register(name, partial(_attend, base=base))
        AttentionMaskInterface.register(name, sdpa_mask if base == "sdpa" else eager_mask)


def layer_mask(
    slot_valid: torch.Tensor, q_len: int, heads: int, dtype: torch.dtype, eager: bool
) -> torch.Tensor | None:
    """Mask for `q_len` new rows over a compressed layer's T slots (the new rows are its last q_len slots).

    slot_valid [B, Hk, T]. Returns None when nothing needs masking (one new row, no padding); else a bool mask
    [B, 1 or H, q, T] (sdpa) or an additive float mask (eager, which adds the mask to its scores). Several new
    rows always get a mask: sdpa given none would treat them as a fresh causal prompt.
    """
    B, Hk, T = slot_valid.shape
    all_valid = bool(slot_valid.all())
    if q_len == 1 and all_valid:
        return None
    if q_len == T and all_valid and not eager:
        # every slot is a new row (the prompt of a layer after prune_at, or of a merged sequence): slot order is
        # position order, so sdpa's own causal mask is right, and lets it use flash attention instead of
        # materialising a [q, T] mask
        return None
    slots = torch.arange(T, device=slot_valid.device)
    rows = torch.arange(T - q_len, T, device=slot_valid.device)
    mask = (slots[None, :] <= rows[:, None])[None, None]  # [1, 1, q, T]
    if not all_valid:
        if bool((slot_valid == slot_valid[:, :1]).all()):
            mask = mask & slot_valid[:, :1, None, :]
        else:  # heads hold different slots: one mask per query head
            mask = mask & slot_valid.repeat_interleave(heads // Hk, dim=1)[:, :, None, :]
    if q_len > 1 and not all_valid:
        # a row that sees no key at all (a padding row at the left of a cut or merged prompt) would give NaN in
        # sdpa, and NaN values leak into every row through zero attention weights: let it see everything
        mask = mask | ~mask.any(-1, keepdim=True)
    if eager:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask
