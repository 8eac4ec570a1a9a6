"""Finding what vlcache hooks in a Hugging Face model: the language model's attention modules and its config."""

from __future__ import annotations

import torch

from ..modality.families import SUPPORTED_FAMILIES, UnsupportedModelError
from .attention import NAMES
from .compat import attn_implementation, set_text_attention


def wrap_generate(model, wrapper):
    """Make `model.generate` call `wrapper`; returns (the generate it wraps, the instance attribute it shadows or
    None) for `unwrap_generate`. Compression and image reuse each wrap, in either order."""
    previous = model.__dict__.get("generate")
    inner = model.generate
    model.generate = wrapper
    return inner, previous


def unwrap_generate(model, previous, wrapper) -> None:
    """Undo `wrap_generate(model, wrapper)`: restore the wrapper that was there before, or the class's own method,
    passing over wrappers that were detached meanwhile. Where another wrapper sits on top (detached out of order),
    it stays: it calls this one, whose owner, detached, passes every call on to what it wrapped."""
    if model.__dict__.get("generate") != wrapper:
        return
    while previous is not None and _detached(previous):
        previous = previous.__self__._previous
    if previous is None:
        model.__dict__.pop("generate", None)
    else:
        model.generate = previous


def _detached(wrapper) -> bool:
    return getattr(getattr(wrapper, "__self__", None), "_attached", True) is False


DEFAULT_NEW_TOKENS = 20  # what generate adds to the prompt when told neither max_new_tokens nor max_length


def new_tokens(kwargs: dict, gc, ids) -> int:
    """How many tokens a generate call given `kwargs` (and generation config `gc`, prompt `ids`) may produce, at
    least 1: its max_new_tokens, else its max_length less the prompt, else transformers' default of 20 more."""
    new = kwargs.get("max_new_tokens", getattr(gc, "max_new_tokens", None))
    if new is None:
        limit = kwargs.get("max_length", getattr(gc, "max_length", None))
        new = DEFAULT_NEW_TOKENS if limit is None else limit - (0 if ids is None else ids.shape[-1])
    return max(1, int(new))


def text_config(model):
    return model.config.get_text_config(decoder=True)


def decoder(model) -> torch.nn.Module:
    """The language model (the part whose KV cache vlcache manages)."""
    lm = model.get_decoder() if hasattr(model, "get_decoder") else None
    if lm is None or not hasattr(lm, "layers"):
        raise _unsupported(f"{type(model).__name__} has no language model with Llama-style decoder layers")
    return lm


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{what}, which vlcache needs. Supported vision-language families: {', '.join(SUPPORTED_FAMILIES)}; "
        "text-only decoders built the same way (Llama, Qwen2, Mistral, ...) work too."
    )


def attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    mods = []
    for layer in decoder(model).layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(attn, "layer_idx", None) is None:
            raise _unsupported(
                f"{type(model).__name__}: decoder layer {type(layer).__name__} has no self_attn with a layer_idx "
                "(transformers' AttentionInterface-based attention)"
            )
        mods.append(attn)
    return mods


def current_implementation(model) -> str:
    return attn_implementation(text_config(model)) or "sdpa"


def set_text_implementation(model, name: str) -> None:
    """Select an attention implementation for the language model only (vision towers keep theirs)."""
    set_text_attention(model, name)


def vlcache_implementation(model) -> tuple[str, str]:
    """(the model's current text attention, the vlcache implementation that wraps it)."""
    current = current_implementation(model)
    if current in NAMES.values():
        raise RuntimeError("this model is already inside vlcache.compress(); nest sessions is not supported")
    if current not in NAMES:
        raise ValueError(
            f"vlcache wraps 'sdpa' and 'eager' attention; this model uses {current!r}. "
            "Load it with attn_implementation='sdpa' (the default) or call model.set_attn_implementation('sdpa')."
        )
    return current, NAMES[current]


def sliding_layers(model) -> list[int]:
    """Decoder layers with sliding-window attention (Gemma 3's local layers)."""
    types = getattr(text_config(model), "layer_types", None) or []
    return [i for i, t in enumerate(types) if t != "full_attention"]


def check_reductions(model, policy) -> None:
    """ValueError when the model cannot take the policy's prune_at / temporal_merge (checked at attach time).

    Sliding-window layers (Gemma 3) are refused after K and with temporal merging: transformers masks them by
    a running count of the tokens they were given, which dropping tokens would put out of step with the
    positions. (Gemma 3 would also need its bidirectional attention inside each image rebuilt on the shorter
    sequence, which vlcache's causal per-layer masks do not do.) Qwen3-VL adds vision features (DeepStack) into its first layers' hidden states at the vision
    positions, so K must come after the last of those layers."""
    L = text_config(model).num_hidden_layers
    sliding = sliding_layers(model)
    K = policy.prune_at
    if K is not None:
        if K >= L:
            raise ValueError(f"prune_at={K} is beyond the model's last decoder layer ({L - 1})")
        after = [i for i in sliding if i >= K]
        if after:
            raise ValueError(
                f"prune_at={K}: decoder layers {after} use sliding-window attention, which cannot compute on a "
                "subset of the tokens (Gemma 3); choose a K at or after the last of them, or drop prune_at"
            )
        deep = getattr(getattr(model.config, "vision_config", None), "deepstack_visual_indexes", None)
        if deep and K < len(deep) - 1:
            raise ValueError(
                f"prune_at={K}: Qwen3-VL adds vision features into decoder layers 0-{len(deep) - 1} (DeepStack); "
                f"use prune_at >= {len(deep) - 1}"
            )
    if policy.temporal_merge is not None and sliding:
        raise ValueError(
            f"temporal_merge: decoder layers {sliding} use sliding-window attention, which counts the tokens it "
            "was given (Gemma 3); temporal merging needs full-attention layers only"
        )
