"""The embedded model: a small Llava trained on the synthetic tasks, shipped inside the package.

It is built from real Hugging Face classes (`LlavaForConditionalGeneration`, `LlavaProcessor` with a character
tokenizer and `CLIPImageProcessorPil`) and loaded with `from_pretrained(path)`, the same path a hub checkpoint
takes. `scripts/train_embedded.py` trains it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T

from ...hf.compat import quiet_progress
from ...testing.models import text_kwargs
from ...testing.processors import build_tokenizer
from .tasks import ANSWER_PREFIX, PATCH, SIZE, Example, prompt_text

EMBEDDED_DIR = Path(__file__).resolve().parents[2] / "embedded"
IMAGE_TOKEN_ID = 250


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


def load_embedded(path: str | Path | None = None, device: str | None = None):
    """(model, processor) of the trained embedded model, loaded offline with from_pretrained."""
    path = Path(path or EMBEDDED_DIR)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no embedded model at {path}; train it with `python scripts/train_embedded.py`")
    with quiet_progress():  # a 3 MB model loads at once; its bar would only clutter stderr
        model = T.LlavaForConditionalGeneration.from_pretrained(path).eval()
    if device:
        model = model.to(device)
    return model, T.LlavaProcessor.from_pretrained(path)


def batch_inputs(processor, examples: list[Example], with_answer: bool = False, device=None) -> dict:
    """Model inputs (on `device` if given) for examples with the same frame count; with `with_answer`, also
    `labels` that score only the answer ("=" and what follows)."""
    texts = [prompt_text(len(e.frames), e.question) for e in examples]
    images = [im for e in examples for im in e.frames]
    answers = [ANSWER_PREFIX + e.answer for e in examples] if with_answer else [""] * len(examples)
    inputs = processor(text=[t + a for t, a in zip(texts, answers)], images=images, return_tensors="pt", padding=True)
    inputs = {k: v.to(device) for k, v in inputs.items()} if device is not None else dict(inputs)
    if with_answer:
        labels = inputs["input_ids"].clone()
        labels[:, : labels.shape[1] - len(answers[0])] = -100
        inputs["labels"] = labels
    return inputs
