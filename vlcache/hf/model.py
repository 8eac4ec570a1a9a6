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


def unwrap_generate(model, previous) -> None:
    """Undo `wrap_generate`: restore the wrapper that was there before, or the class's own method."""
    if previous is None:
        model.__dict__.pop("generate", None)
    else:
        model.generate = previous


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
