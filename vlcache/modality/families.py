"""Per-family knowledge: placeholder token ids, marker tokens, and how many tokens each image / frame takes.

Everything here is read from the model config (and, optionally, the tokenizer for markers the config does not
name). Token counts come from the tensors the processor hands to the model (`image_grid_thw`, `image_sizes`,
`pixel_values_videos`, ...) so that adjacent images without text between them are still told apart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .layout import _runs


class UnsupportedModelError(ValueError):
    """Raised for a model family vlcache has no modality map for."""


@dataclass(frozen=True)
class Family:
    name: str
    image_token: int | None
    video_token: int | None
    markers: frozenset[int] = frozenset()
    # (input_ids, model inputs, config) -> tokens per image across the batch, or None if unknown
    image_chunks: Callable | None = field(default=None, repr=False)
    # (input_ids, model inputs, config) -> per video, tokens per frame (negative: tokens of no frame)
    video_chunks: Callable | None = field(default=None, repr=False)


def _get(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def _side(vision_config) -> int:
    size = vision_config.image_size
    patch = vision_config.patch_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    return size // patch


# ----------------------------------------------------------------------------------------------- LLaVA family


def _llava_images(input_ids, inputs, config):
    pv = inputs.get("pixel_values")
    if pv is None:
        return None
    n = _get(config, "image_seq_length")
    if n is None:
        return None
    return [int(n)] * int(pv.shape[0])


def _select_best_resolution(orig_hw, pinpoints):
    # LLaVA-NeXT's rule: the pinpoint that keeps the most effective resolution, then the least waste
    oh, ow = orig_hw
    best, best_eff, best_waste = None, -1, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        eff = min(dw * dh, ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def _anyres_count(orig_hw, config, base: int, side: int, max_patches: int | None) -> int:
    """Tokens of one any-resolution image: base view + unpadded high-res grid + one newline per grid row."""
    tile = config.vision_config.image_size
    tile = tile[0] if isinstance(tile, (list, tuple)) else tile
    bh, bw = _select_best_resolution(orig_hw, config.image_grid_pinpoints)
    cur_h, cur_w = side * (bh // tile), side * (bw // tile)
    oh, ow = orig_hw
    if ow / oh > cur_w / cur_h:
        new_h = int(round(oh * (cur_w / ow), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(ow * (cur_h / oh), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    unpadded, newlines = cur_h * cur_w, cur_h
    if max_patches is not None:
        ratio = math.sqrt(cur_h * cur_w / (max_patches * side**2))
        if ratio > 1.1:
            unpadded = int(cur_h // ratio) * int(cur_w // ratio)
            newlines = int(cur_h // ratio)
    return base + unpadded + newlines


def _llava_next_images(input_ids, inputs, config):
    sizes = inputs.get("image_sizes")
    if sizes is None or getattr(config, "image_grid_pinpoints", None) is None:
        return None
    side = _side(config.vision_config)
    base = side * side  # the "default" strategy drops CLS, which leaves exactly the patch grid
    return [_anyres_count(tuple(int(x) for x in hw), config, base, side, None) for hw in sizes.tolist()]


def _onevision_images(input_ids, inputs, config):
    sizes = inputs.get("image_sizes")
    if sizes is None:
        return None
    side = _side(config.vision_config)
    m = re.match(r"anyres_max_(\d+)", str(getattr(config, "vision_aspect_ratio", "anyres_max_9")))
    max_patches = int(m.group(1)) if m else None
    return [_anyres_count(tuple(int(x) for x in hw), config, side * side, side, max_patches) for hw in sizes.tolist()]


def _onevision_videos(input_ids, inputs, config):
    pv = inputs.get("pixel_values_videos")
    if pv is None:
        return None
    side = _side(config.vision_config)
    per_frame = math.ceil(side / 2) ** 2  # bilinear 2x downsampling of the patch grid
    # one newline token closes every video; it carries the video token id but belongs to no frame
    return [[per_frame] * int(pv.shape[1]) + [-1] for _ in range(pv.shape[0])]


def _next_video_videos(input_ids, inputs, config):
    pv = inputs.get("pixel_values_videos")
    if pv is None:
        return None
    side = _side(config.vision_config)
    stride = getattr(config, "spatial_pool_stride", 2)
    return [[(side // stride) ** 2] * int(pv.shape[1]) for _ in range(pv.shape[0])]


# ----------------------------------------------------------------------------------------------- Qwen-VL family


def _merge(config) -> int:
    return int(getattr(config.vision_config, "spatial_merge_size", 2))


def _qwen_images(input_ids, inputs, config):
    thw = inputs.get("image_grid_thw")
    if thw is None:
        return None
    m2 = _merge(config) ** 2
    return [int(t * h * w) // m2 for t, h, w in thw.tolist()]


def _qwen_videos(input_ids, inputs, config):
    thw = inputs.get("video_grid_thw")
    if thw is None:
        return None
    m2 = _merge(config) ** 2
    # one "frame" per temporal patch (2 video frames each at the default temporal_patch_size)
    return [[int(h * w) // m2] * int(t) for t, h, w in thw.tolist()]


# ----------------------------------------------------------------------------------------------- Idefics3 / SmolVLM


def _idefics_images(global_token: int | None):
    """An image is its tiles' runs, closed by the run that follows <global-img>. Without that token's id (it is
    not in the config), tiles cannot be grouped and each run becomes its own span."""

    def chunks(input_ids, inputs, config):
        if global_token is None:
            return None
        out = []
        for row in input_ids.tolist():
            pos = [i for i, t in enumerate(row) if t == config.image_token_id]
            acc = 0
            for start, end in _runs(pos):
                acc += end - start
                if global_token in row[max(0, start - 2) : start]:
                    out.append(acc)
                    acc = 0
            if acc:  # tiles with no global view after them: not the layout we know
                return None
        return out

    return chunks


# ----------------------------------------------------------------------------------------------- registry


def _token_id(tokenizer, token: str) -> int | None:
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return vocab.get(token)


def _ids(tokenizer, *tokens) -> frozenset[int]:
    return frozenset(i for i in (_token_id(tokenizer, t) for t in tokens) if i is not None)


def _tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def family_for(config, processor=None) -> Family:
    """The `Family` of a model config. `processor` (or tokenizer) is optional and only adds marker ids that the
    config does not carry (Idefics3's <fake_token_around_image>/<global-img>, InternVL's <img>/</img>)."""
    mt = getattr(config, "model_type", None)
    tok = _tokenizer_of(processor)
    img = _get(config, "image_token_id", "image_token_index")
    vid = _get(config, "video_token_id", "video_token_index")
    if mt == "llava":
        return Family(mt, img, None, image_chunks=_llava_images)
    if mt == "llava_next":
        return Family(mt, img, None, image_chunks=_llava_next_images)
    if mt == "llava_next_video":
        return Family(mt, img, vid, image_chunks=_llava_next_images, video_chunks=_next_video_videos)
    if mt == "llava_onevision":
        return Family(mt, img, vid, image_chunks=_onevision_images, video_chunks=_onevision_videos)
    if mt in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        markers = frozenset(x for x in (config.vision_start_token_id, config.vision_end_token_id) if x is not None)
        return Family(mt, img, vid, markers, image_chunks=_qwen_images, video_chunks=_qwen_videos)
    if mt in ("idefics3", "smolvlm"):
        fake, glob = _token_id(tok, "<fake_token_around_image>"), _token_id(tok, "<global-img>")
        markers = {i for i in (fake, glob) if i is not None}
        if tok is not None:
            markers |= {i for t, i in tok.get_vocab().items() if re.fullmatch(r"<row_\d+_col_\d+>", t)}
        return Family(mt, img, None, frozenset(markers), image_chunks=_idefics_images(glob))
    if mt == "internvl":
        return Family(mt, img, _get(config, "video_token_id"), _ids(tok, "<img>", "</img>"))
    if mt == "gemma3":
        markers = frozenset(x for x in (config.boi_token_index, config.eoi_token_index) if x is not None)
        return Family(mt, img, None, markers, image_chunks=lambda ids, inp, cfg: _gemma_images(inp, cfg))
    if _is_text_only(config):
        return Family("text", None, None)
    raise UnsupportedModelError(
        f"vlcache has no modality map for model_type={mt!r}. Supported vision-language families: "
        f"{', '.join(SUPPORTED_FAMILIES)}; text-only decoder models are supported too."
    )


def _gemma_images(inputs, config):
    pv = inputs.get("pixel_values")
    if pv is None:
        return None
    return [int(config.mm_tokens_per_image)] * int(pv.shape[0])


def _is_text_only(config) -> bool:
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "vision_config", None) is not None:
        return False
    # a decoder with attention layers: what the cache and hook need
    return (
        getattr(config, "num_hidden_layers", None) is not None
        and getattr(config, "num_attention_heads", None) is not None
    )


SUPPORTED_FAMILIES = (
    "llava",
    "llava_next",
    "llava_next_video",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "internvl",
    "gemma3",
)


def layout_kwargs(family: Family, input_ids: torch.Tensor, inputs: Mapping, config) -> dict:
    """Chunk sizes for `build_layout`, computed from the model inputs."""
    return dict(
        family=family.name,
        image_token=family.image_token,
        video_token=family.video_token,
        markers=family.markers,
        image_chunks=family.image_chunks(input_ids, inputs, config) if family.image_chunks else None,
        video_chunks=family.video_chunks(input_ids, inputs, config) if family.video_chunks else None,
    )
