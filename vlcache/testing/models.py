"""Tiny randomly initialised VLMs of every supported family, built from configs (no hub access).

They exist for tests and for the default main job: each has a 2-layer text tower (hidden 64, 4 query heads,
2 KV heads) and a 2-layer vision tower, and runs `generate` with images on a CPU in tens of milliseconds.
Real checkpoints go through exactly the same vlcache code.

Vocabulary (shared with `vlcache.testing.processors`): 0 pad, 1 bos, 2 eos, 3 unk, 4..103 printable characters,
250 image, 251 video, 252..255 vision markers.
"""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 256
IMG, VID = 250, 251
VSTART, VEND, BOI, EOI = 252, 253, 254, 255


def text_kwargs(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, **extra) -> dict:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(extra)
    return kw


def clip_vision(grid: int, patch: int) -> T.CLIPVisionConfig:
    return T.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=grid * patch,
        patch_size=patch,
        projection_dim=32,
    )


def siglip_vision(grid: int, patch: int) -> T.SiglipVisionConfig:
    return T.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=grid * patch,
        patch_size=patch,
    )


def _qwen_text(cls, **extra):
    kw = text_kwargs(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    kw.update(extra)
    return cls(**kw)


def llava(grid=8, patch=4, **text):
    cfg = T.LlavaConfig(
        vision_config=clip_vision(grid, patch),
        text_config=T.LlamaConfig(**text_kwargs(**text)),
        image_token_index=IMG,
        image_seq_length=grid * grid,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return T.LlavaForConditionalGeneration(cfg)


def llava_next(grid=8, patch=4, **text):
    S = grid * patch
    cfg = T.LlavaNextConfig(
        vision_config=clip_vision(grid, patch),
        text_config=T.LlamaConfig(**text_kwargs(**text)),
        image_token_index=IMG,
        image_grid_pinpoints=[[S, S], [S, 2 * S]],
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return T.LlavaNextForConditionalGeneration(cfg)


def llava_next_video(grid=8, patch=4, **text):
    S = grid * patch
    cfg = T.LlavaNextVideoConfig(
        vision_config=clip_vision(grid, patch),
        text_config=T.LlamaConfig(**text_kwargs(**text)),
        image_token_index=IMG,
        video_token_index=VID,
        image_grid_pinpoints=[[S, S]],
        spatial_pool_stride=2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        video_seq_length=(grid // 2) ** 2,
    )
    return T.LlavaNextVideoForConditionalGeneration(cfg)


def llava_onevision(grid=8, patch=4, **text):
    S = grid * patch
    cfg = T.LlavaOnevisionConfig(
        vision_config=siglip_vision(grid, patch),
        text_config=T.Qwen2Config(**text_kwargs(**text)),
        image_token_index=IMG,
        video_token_index=VID,
        image_grid_pinpoints=[[S, S]],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return T.LlavaOnevisionForConditionalGeneration(cfg)


def qwen_vl_model(config_cls, model_cls, vision, text):
    """A Qwen-VL model from its vision and text configs, with the shared special-token ids."""
    cfg = config_cls(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
    )
    return model_cls(cfg)


# the vision towers' common part: 2 blocks, 2x2 spatial merge, 2-frame temporal patches
_QWEN_VISION = dict(depth=2, num_heads=2, spatial_merge_size=2, temporal_patch_size=2)


def qwen2_vl(grid=8, patch=4, **text):
    vision = T.Qwen2VLVisionConfig(embed_dim=32, hidden_size=64, patch_size=patch, **_QWEN_VISION)
    return qwen_vl_model(
        T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration, vision, _qwen_text(T.Qwen2VLTextConfig, **text)
    )


def qwen2_5_vl(grid=8, patch=4, **text):
    vision = T.Qwen2_5_VLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=64,
        patch_size=patch,
        window_size=patch * 4,
        fullatt_block_indexes=[1],
        **_QWEN_VISION,
    )
    return qwen_vl_model(
        T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration, vision, _qwen_text(T.Qwen2_5_VLTextConfig, **text)
    )


def qwen3_vl(grid=8, patch=4, **text):
    vision = T.Qwen3VLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=64,
        patch_size=patch,
        num_position_embeddings=64,
        deepstack_visual_indexes=[1],
        **_QWEN_VISION,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text_config = _qwen_text(T.Qwen3VLTextConfig, head_dim=16, rope_parameters=rope, **text)
    return qwen_vl_model(T.Qwen3VLConfig, T.Qwen3VLForConditionalGeneration, vision, text_config)


def _idefics_like(cfg_cls, vis_cls, model_cls, grid, patch, text):
    vc = vis_cls(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=grid * patch,
        patch_size=patch,
    )
    cfg = cfg_cls(
        vision_config=vc.to_dict(),
        text_config=T.LlamaConfig(**text_kwargs(**text)).to_dict(),
        image_token_id=IMG,
        scale_factor=2,
    )
    return model_cls(cfg)


def idefics3(grid=8, patch=4, **text):
    return _idefics_like(
        T.Idefics3Config, T.Idefics3VisionConfig, T.Idefics3ForConditionalGeneration, grid, patch, text
    )


def smolvlm(grid=8, patch=4, **text):
    return _idefics_like(T.SmolVLMConfig, T.SmolVLMVisionConfig, T.SmolVLMForConditionalGeneration, grid, patch, text)


def internvl(grid=8, patch=4, **text):
    S = grid * patch
    vc = T.InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=(S, S),
        patch_size=(patch, patch),
    )
    cfg = T.InternVLConfig(
        vision_config=vc.to_dict(),
        text_config=T.Qwen2Config(**text_kwargs(**text)).to_dict(),
        image_token_id=IMG,
        image_seq_length=grid * grid // 4,
        downsample_ratio=0.5,
    )
    return T.InternVLForConditionalGeneration(cfg)


def gemma3(grid=8, patch=4, **text):
    tps = grid // 2
    kw = text_kwargs(
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
    )
    kw.update(text)
    cfg = T.Gemma3Config(
        text_config=T.Gemma3TextConfig(**kw).to_dict(),
        vision_config=siglip_vision(grid, patch).to_dict(),
        mm_tokens_per_image=tps * tps,
        image_token_index=IMG,
        boi_token_index=BOI,
        eoi_token_index=EOI,
    )
    return T.Gemma3ForConditionalGeneration(cfg)


def llama(**text):
    """A text-only decoder (for the peer comparison with text-only KV compression libraries)."""
    return T.LlamaForCausalLM(T.LlamaConfig(**text_kwargs(**text)))


BUILDERS = {
    "llava": llava,
    "llava_next": llava_next,
    "llava_next_video": llava_next_video,
    "llava_onevision": llava_onevision,
    "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl,
    "qwen3_vl": qwen3_vl,
    "idefics3": idefics3,
    "smolvlm": smolvlm,
    "internvl": internvl,
    "gemma3": gemma3,
}


def build(family: str, *, seed: int = 0, grid: int = 8, patch: int = 4, dtype=torch.float32, **text):
    """A tiny model of `family`, seeded, in eval mode."""
    if family not in BUILDERS:
        raise ValueError(f"no tiny builder for {family!r}; choose one of {', '.join(BUILDERS)}")
    torch.manual_seed(seed)
    return BUILDERS[family](grid=grid, patch=patch, **text).to(dtype).eval()
