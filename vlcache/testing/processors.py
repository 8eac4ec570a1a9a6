"""Hub-free processors for the tiny models: a character-level tokenizer plus the `*Pil` image processors.

The tokenizer maps every printable character to one token and keeps the vision special tokens at the ids the
tiny models use. Processors whose constructor wants a video processor (which needs torchvision) are built
through `image_only`, so video inputs for tests are made by hand (`vlcache.testing.inputs`).
"""

from __future__ import annotations

import string

import transformers as T
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from .models import BOI, EOI, IMG, VEND, VID, VOCAB, VSTART

CHARS = list(string.printable)  # 100 characters, whitespace included

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tokenizer(specials: dict[str, int], named: dict[str, str] | None = None, chat_template=None):
    """`specials`: token string -> fixed id (< VOCAB). `named`: attribute -> token string (tokenizer.image_token)."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i, ch in enumerate(CHARS):
        vocab[ch] = 4 + i
    used = set(vocab.values())
    for tok, idx in specials.items():
        if idx >= VOCAB or idx in used:
            raise ValueError(f"special token {tok!r} wants id {idx}, which is taken or out of the vocabulary")
        vocab[tok] = idx
        used.add(idx)
    for i in range(VOCAB):  # contiguous ids: the embedding table has no holes
        if i not in used:
            vocab[f"<unused{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>", *specials])
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=named or {},
        chat_template=chat_template,
        padding_side="left",
    )


def image_only(cls):
    """Processors whose __init__ takes `video_processor` need torchvision; this subclass passes None for it."""

    class ImageOnly(cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
            super().__init__(
                image_processor=image_processor,
                tokenizer=tokenizer,
                video_processor=None,
                chat_template=chat_template,
                **kw,
            )

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__ + "ImageOnly"
    return ImageOnly


def _llava_tok():
    return build_tokenizer(
        {"<image>": IMG, "<video>": VID}, {"image_token": "<image>", "video_token": "<video>"}, CHAT_TEMPLATE
    )


def llava(grid=8, patch=4):
    S = grid * patch
    ip = T.CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    return T.LlavaProcessor(
        image_processor=ip,
        tokenizer=_llava_tok(),
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def llava_next(grid=8, patch=4):
    S = grid * patch
    ip = T.LlavaNextImageProcessorPil(
        size={"shortest_edge": S}, crop_size={"height": S, "width": S}, image_grid_pinpoints=[[S, S], [S, 2 * S]]
    )
    return T.LlavaNextProcessor(
        image_processor=ip,
        tokenizer=_llava_tok(),
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def llava_onevision(grid=8, patch=4):
    S = grid * patch
    ip = T.LlavaOnevisionImageProcessorPil(size={"height": S, "width": S}, image_grid_pinpoints=[[S, S]])
    return image_only(T.LlavaOnevisionProcessor)(
        image_processor=ip,
        tokenizer=_llava_tok(),
        num_image_tokens=grid * grid,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
    )


def qwen_tokenizer(chat_template=None):
    """The Qwen-VL families' tokenizer: their image, video and vision-marker tokens on the shared ids."""
    return build_tokenizer(
        {"<|image_pad|>": IMG, "<|video_pad|>": VID, "<|vision_start|>": VSTART, "<|vision_end|>": VEND},
        {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        chat_template,
    )


def _qwen(cls, grid=8, patch=4):
    S = grid * patch
    tok = qwen_tokenizer()
    ip = T.Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2, size={"shortest_edge": S * S, "longest_edge": S * S}
    )
    return image_only(cls)(image_processor=ip, tokenizer=tok)


def _idefics(cls, ip_cls, grid=8, patch=4):
    S = grid * patch
    tok = build_tokenizer(
        {"<image>": IMG, "<fake_token_around_image>": BOI, "<global-img>": EOI, "<end_of_utterance>": 249},
        {"image_token": "<image>"},
    )
    ip = ip_cls(do_image_splitting=False, size={"longest_edge": S}, max_image_size={"longest_edge": S})
    return cls(image_processor=ip, tokenizer=tok, image_seq_len=grid * grid // 4)


def idefics3(grid=8, patch=4):
    from ..hf.compat import Idefics3ImageProcessorPil  # from its own module: see compat (5.17's lazy import)

    return _idefics(T.Idefics3Processor, Idefics3ImageProcessorPil, grid, patch)


def smolvlm(grid=8, patch=4):
    from ..hf.compat import SmolVLMImageProcessorPil

    return _idefics(image_only(T.SmolVLMProcessor), SmolVLMImageProcessorPil, grid, patch)


def internvl(grid=8, patch=4):
    S = grid * patch
    tok = build_tokenizer(
        {"<IMG_CONTEXT>": IMG, "<video>": VID, "<img>": BOI, "</img>": EOI},
        {
            "context_image_token": "<IMG_CONTEXT>",
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "video_token": "<video>",
        },
    )
    ip = T.GotOcr2ImageProcessorPil(size={"height": S, "width": S}, crop_to_patches=False)
    return image_only(T.InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=grid * grid // 4)


def gemma3(grid=8, patch=4):
    S = grid * patch
    tps = grid // 2
    tok = build_tokenizer(
        {"<image_soft_token>": IMG, "<start_of_image>": BOI, "<end_of_image>": EOI},
        {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    )
    ip = T.Gemma3ImageProcessorPil(size={"height": S, "width": S})
    return T.Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=tps * tps)


PROCESSORS = {
    "llava": llava,
    "llava_next": llava_next,
    "llava_onevision": llava_onevision,
    "qwen2_vl": lambda **k: _qwen(T.Qwen2VLProcessor, **k),
    "qwen2_5_vl": lambda **k: _qwen(T.Qwen2_5_VLProcessor, **k),
    "qwen3_vl": lambda **k: _qwen(T.Qwen3VLProcessor, **k),
    "idefics3": idefics3,
    "smolvlm": smolvlm,
    "internvl": internvl,
    "gemma3": gemma3,
}

# how each family's prompt names an image (the processor expands it into the vision tokens)
IMAGE_PLACEHOLDER = {
    "llava": "<image>",
    "llava_next": "<image>",
    "llava_onevision": "<image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>",
    "smolvlm": "<image>",
    "internvl": "<IMG_CONTEXT>",
    "gemma3": "<start_of_image>",
}


def processor(family: str, grid: int = 8, patch: int = 4):
    if family not in PROCESSORS:
        raise ValueError(f"no tiny processor for {family!r}; choose one of {', '.join(PROCESSORS)}")
    return PROCESSORS[family](grid=grid, patch=patch)
