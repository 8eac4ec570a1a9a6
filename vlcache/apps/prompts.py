"""What the apps ask a model about frames: the prompt (each frame after a text marker, through the chat template),
the default question and how many new tokens an answer needs."""

from __future__ import annotations

from .model_loading import is_embedded


def default_question(model) -> str:
    """What to ask for a caption: the embedded model's trained question, or a plain request."""
    return "describe?" if is_embedded(model) else "Describe this video in one sentence."


def answer_tokens(model, default: int = 64) -> int:
    """New tokens an answer needs: for the embedded model "=" and its longest answer, describe's one place per
    palette colour (9, whatever the number of frames); for any other model `default`."""
    if is_embedded(model):
        from .evaluation.tasks import ANSWER_PREFIX, COLOR_KEYS

        return len(ANSWER_PREFIX) + len(COLOR_KEYS)
    return default


def frames_inputs(processor, frames, question: str, device=None) -> dict:
    """Model inputs for a question about frames given as images, each after a text marker ("f0<image>f1<image>
    question"), through the processor's chat template when it has one. `frames` is one video (a list of images)
    or a batch of them (a list of lists), left-padded."""
    videos = frames if frames and isinstance(frames[0], (list, tuple)) else [frames]
    texts = [_frames_prompt(processor, len(v), question) for v in videos]
    tokenizer = getattr(processor, "tokenizer", None)
    side = getattr(tokenizer, "padding_side", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"  # generation appends on the right
    try:
        inputs = processor(images=[im for v in videos for im in v], text=texts, return_tensors="pt", padding=True)
    finally:
        if tokenizer is not None:
            tokenizer.padding_side = side
    return {k: v.to(device) if device is not None and hasattr(v, "to") else v for k, v in inputs.items()}


def _frames_prompt(processor, n: int, question: str) -> str:
    content = []
    for i in range(n):
        content += [{"type": "text", "text": f"f{i}"}, {"type": "image"}]
    content.append({"type": "text", "text": " " + question})
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    token = getattr(processor, "image_token", None) or "<image>"
    return "".join(c["text"] if c["type"] == "text" else token for c in content)
