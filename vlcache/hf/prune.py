"""prune_at in a Hugging Face model: forward pre-hooks on the decoder layers after K that hand them only the tokens
kept at layer K. The decoder loop computes one set of inputs for all its layers (hidden states once; rotary
tables, position ids and mask per layer), sized for the whole prompt: the hooks gather the kept rows of each
(rotary tables and position ids are sliced, so every kept token keeps its original position) and drop the
mask, which vlcache's attention rebuilds from the cache's slots for these layers."""

from __future__ import annotations

import torch

from .cache import DEAD


def cut_layer_inputs(cache, layer_idx: int, args: tuple, kwargs: dict):
    """(args, kwargs) of decoder layer `layer_idx` (after K) cut to the kept tokens, or None outside a prefill."""
    if cache is None or cache.prefilled or cache.cut is None:
        return None
    keep, filler = cache.cut
    n = cache.layout.length
    hidden = args[0] if args else kwargs["hidden_states"]
    keep = keep.to(hidden.device)
    if hidden.shape[1] == n:  # the first layer after K: the hidden states still hold every token
        hidden = hidden.gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": hidden}
    kwargs = dict(kwargs)
    pe = kwargs.get("position_embeddings")
    if pe is not None:
        kwargs["position_embeddings"] = tuple(_gather_seq(t, keep, n, dim=-2) for t in pe)
    if isinstance(kwargs.get("position_ids"), torch.Tensor):
        kwargs["position_ids"] = _gather_seq(kwargs["position_ids"], keep, n, dim=-1)
    kwargs["attention_mask"] = None
    layer = cache.layers[layer_idx]
    positions = keep if filler is None else keep.masked_fill(filler.to(keep.device), DEAD)
    layer.incoming = (positions[:, None, :], n)
    return args, kwargs


def _gather_seq(t: torch.Tensor, keep: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """t with its sequence dimension `dim` (of size n, batch just before it) gathered at keep [B, m]."""
    if t.shape[dim] != n:
        return t
    t = t.movedim(dim, -1) if dim != -1 else t  # [..., B, (rest), n]
    B, m = keep.shape
    if dim == -2:  # [..., B, n, d] -> work on [..., B, d, n]
        lead = t.shape[:-3]
        t = t.expand(*lead, B, *t.shape[-2:]) if t.shape[-3] != B else t
        index = keep[:, None, :].expand(*lead, B, t.shape[-2], m)
        return t.gather(-1, index).movedim(-1, -2)
    lead = t.shape[:-2]
    t = t.expand(*lead, B, n) if t.shape[-2] != B else t
    return t.gather(-1, keep.expand(*lead, B, m))
