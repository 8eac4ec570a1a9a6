"""The embedded models: small VLMs trained on the synthetic tasks, shipped inside the package.

- `embedded/`: a Llava (`LlavaForConditionalGeneration`, `LlavaProcessor` with a character tokenizer and
  `CLIPImageProcessorPil`), one flat 4 x 4 patch grid per frame and 1-D RoPE; the default everywhere.
- `embedded_qwen/`: a Qwen2-VL (`Qwen2VLForConditionalGeneration`, the Qwen2-VL processor with the same character
  tokenizer and `Qwen2VLImageProcessorPil`): each frame a separate image between `<|vision_start|>` and
  `<|vision_end|>`, upscaled 2x to 32 x 32 pixels, 8 x 8 patches merged 2 x 2 into the same 4 x 4 tokens (one per
  task cell), with M-RoPE positions (time, row, column).

Both load with `from_pretrained(path)`, the same path a hub checkpoint takes; `scripts/train_embedded.py` trains
them (`--family`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers as T

from ...hf.compat import from_pretrained, quiet_progress
from ...testing.models import IMG, qwen_vl_model, text_kwargs
from ...testing.processors import build_tokenizer, image_only, qwen_tokenizer
from .tasks import ANSWER_PREFIX, PATCH, SIZE, Example, prompt_text

EMBEDDED_DIR = Path(__file__).resolve().parents[2] / "embedded"
EMBEDDED_QWEN_DIR = Path(__file__).resolve().parents[2] / "embedded_qwen"
EMBEDDED = {"llava": EMBEDDED_DIR, "qwen": EMBEDDED_QWEN_DIR}  # names `load_embedded` takes besides paths
IMAGE_TOKEN_ID = IMG  # the fixtures' vocabulary: the embedded models' tokenizers are built the same way
FAMILIES = ("llava", "qwen2_vl")  # the embedded models' model_type, the key of every per-family table here


def build_untrained(seed: int = 0, layers: int = 4, hidden: int = 128, heads: int = 4, kv_heads: int = 2):
    """A Llava with random weights: 1-layer CLIP tower (64 wide) and a Llama of `layers` x `hidden`."""
    torch.manual_seed(seed)
    vision = T.CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=SIZE,
        patch_size=PATCH,
    )
    text = T.LlamaConfig(
        **text_kwargs(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, max_position_embeddings=4096)
    )
    config = T.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=(SIZE // PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    model = T.LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    return model


# a chat message renders exactly as the training prompt: "f0<image>f1<image> describe?"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}"
)


def build_processor():
    tokenizer = build_tokenizer({"<image>": IMAGE_TOKEN_ID}, {"image_token": "<image>"}, CHAT_TEMPLATE)
    # nearest-neighbour resizing: a frame upscaled by a whole factor (the sample videos are 4x) comes back exactly
    image_processor = T.CLIPImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, do_center_crop=True, resample=0
    )
    return T.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


# ------------------------------------------------------------------------------------------ the Qwen2-VL one

QWEN_SCALE = 2  # frames are upscaled 2x (nearest): a 4 x 4-pixel task cell becomes one 2 x 2 merge of 4-px patches
QWEN_PATCH, QWEN_MERGE, QWEN_TEMPORAL = 4, 2, 2
QWEN_SIDE = QWEN_SCALE * SIZE  # 32 x 32 pixels: 8 x 8 patches, 4 x 4 = 16 tokens a frame after merging
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # one frame in the prompt; the processor expands the pad


def build_untrained_qwen(seed: int = 0, layers: int = 4, hidden: int = 128, heads: int = 4, kv_heads: int = 2):
    """A Qwen2-VL with random weights: a 1-block vision tower (64 wide, patch 4, 2 x 2 merge, temporal patch 2)
    and a Qwen2 text model of `layers` x `hidden` with M-RoPE (sections 1/4, 3/8, 3/8 of the rotary pairs for
    time, row and column, the proportions of the released Qwen2-VL's [16, 24, 24])."""
    torch.manual_seed(seed)
    half = hidden // heads // 2
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    vision = T.Qwen2VLVisionConfig(
        depth=1,
        embed_dim=64,
        hidden_size=hidden,  # the merger's output: the text model's width
        mlp_ratio=2,
        num_heads=2,
        patch_size=QWEN_PATCH,
        spatial_merge_size=QWEN_MERGE,
        temporal_patch_size=QWEN_TEMPORAL,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    text = T.Qwen2VLTextConfig(
        **text_kwargs(
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            max_position_embeddings=4096,
            rope_parameters=rope,
            rms_norm_eps=1e-6,  # Llama's (Qwen2 defaults to 1e-5): a text model copied from the Llava computes the same
        )
    )
    model = qwen_vl_model(T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration, vision, text)
    model.generation_config.pad_token_id = 0
    return model


# renders exactly as the training prompt: "f0<|vision_start|><|image_pad|><|vision_end|>f1... describe?"
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}" + QWEN_IMAGE + "{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}"
)
# the Qwen2-VL processor without its video processor, which needs torchvision (images only: a frame is an image)
Qwen2VLImageProcessor = image_only(T.Qwen2VLProcessor)


def build_processor_qwen():
    tokenizer = qwen_tokenizer(QWEN_CHAT_TEMPLATE)
    pixels = QWEN_SIDE * QWEN_SIDE  # min = max: every frame is resized to 32 x 32, nearest-neighbour (exact 2x)
    image_processor = T.Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH,
        merge_size=QWEN_MERGE,
        temporal_patch_size=QWEN_TEMPORAL,
        size={"shortest_edge": pixels, "longest_edge": pixels},
        resample=0,
    )
    return Qwen2VLImageProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE)


# ------------------------------------------------------------------------------------------ both

BUILDERS = {"llava": build_untrained, "qwen2_vl": build_untrained_qwen}
PROCESSORS = {"llava": build_processor, "qwen2_vl": build_processor_qwen}
CLASSES = {
    "llava": (T.LlavaForConditionalGeneration, T.LlavaProcessor),
    "qwen2_vl": (T.Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor),
}


def family_of(path: str | Path) -> str:
    """The model_type of a saved embedded model (one of `FAMILIES`)."""
    family = json.loads((Path(path) / "config.json").read_text()).get("model_type")
    if family not in CLASSES:
        raise ValueError(f"{path}: an embedded model is one of {', '.join(FAMILIES)}, not {family!r}")
    return family


def load_embedded(path: str | Path | None = None, device: str | None = None):
    """(model, processor) of a trained embedded model, loaded offline with from_pretrained. `path`: a directory,
    or a name of `EMBEDDED` ("llava", "qwen"); None: the Llava in `embedded/`."""
    path = Path(EMBEDDED.get(str(path), path)) if path else EMBEDDED_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no embedded model at {path}; train it with `python scripts/train_embedded.py`")
    model_cls, processor_cls = CLASSES[family_of(path)]
    with quiet_progress():  # a 3 MB model loads at once; its bar would only clutter stderr
        model = from_pretrained(model_cls, path).eval()
    if device:
        model = model.to(device)
    return model, processor_cls.from_pretrained(path)


def load_embedded_qwen(path: str | Path | None = None, device: str | None = None):
    """(model, processor) of the trained Qwen2-VL embedded model (`embedded_qwen/`)."""
    return load_embedded(path or EMBEDDED_QWEN_DIR, device)


def image_prompt(processor) -> str:
    """How one frame is written in the prompt: the processor's image token, between the vision start and end
    markers where the tokenizer has them (Qwen2-VL); the processor expands the image token to the frame's tokens."""
    tokenizer = processor.tokenizer
    start, end = getattr(tokenizer, "vision_start_token", None), getattr(tokenizer, "vision_end_token", None)
    return f"{start}{processor.image_token}{end}" if start and end else processor.image_token


def batch_inputs(processor, examples: list[Example], with_answer: bool = False, device=None) -> dict:
    """Model inputs (on `device` if given) for examples with the same frame count, for either embedded model's
    processor; with `with_answer`, also `labels` that score only the answer ("=" and what follows)."""
    image = image_prompt(processor)
    texts = [prompt_text(len(e.frames), e.question, image) for e in examples]
    images = [im for e in examples for im in e.frames]
    answers = [ANSWER_PREFIX + e.answer for e in examples] if with_answer else [""] * len(examples)
    inputs = processor(text=[t + a for t, a in zip(texts, answers)], images=images, return_tensors="pt", padding=True)
    inputs = {k: v.to(device) for k, v in inputs.items()} if device is not None else dict(inputs)
    if with_answer:
        labels = inputs["input_ids"].clone()
        labels[:, : labels.shape[1] - len(answers[0])] = -100
        inputs["labels"] = labels
    return inputs
