"""Shared by the apps (CLI, captioning, demo, benchmarks): load a model, turn frames into inputs, run one request
with timings. Thin: everything here goes through the public API."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

import vlcache

from .policies import Policy
from .stats import CompressionStats

DEFAULT_MODEL = "embedded"


def load(name: str | None = None, *, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, processor) for a hub id or a local path. None or "embedded": the trained embedded model shipped in
    the package (a small Llava that reads synthetic videos); "tiny": a tiny Llava with random weights."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name in (None, DEFAULT_MODEL):
        from .evaluation.model import load_embedded

        return load_embedded(device=device)
    if name == "tiny":
        from . import tiny

        return tiny.build("llava").to(device), tiny.processor("llava")
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from .model_source import resolve

    source = resolve(name)  # a missing directory or an unreachable hub fails here, in seconds
    kw = {"local_files_only": True} if source.local_only else {}
    try:
        _check_family(name, AutoConfig.from_pretrained(source.name, **kw))  # before any weight is read
        processor = AutoProcessor.from_pretrained(source.name, **kw)
        model = AutoModelForImageTextToText.from_pretrained(
            source.name, **kw, dtype=dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32),
            device_map=device,
        )  # fmt: skip
    except OSError as e:
        raise ValueError(f"cannot load model {name!r}: {_first_line(e)}") from e
    return model.eval(), processor


def _check_family(name: str, config) -> None:
    from .modality import SUPPORTED_FAMILIES, UnsupportedModelError, family_for

    if family_for(config).name == "text":  # raises itself, listing the families, for anything else unknown
        raise UnsupportedModelError(
            f"--model {name}: a text-only {config.model_type} model; the apps need a vision-language model. "
            f"Supported vision-language families: {', '.join(SUPPORTED_FAMILIES)}"
        )


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def is_embedded(model) -> bool:
    from .evaluation.model import EMBEDDED_DIR

    return str(getattr(model, "name_or_path", "")) == str(EMBEDDED_DIR)


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


@dataclass
class RunResult:
    tokens: list[int]  # generated ids of row 0
    text: str  # of row 0
    stats: CompressionStats | None  # at the end of generation
    prefill_stats: CompressionStats | None  # right after the prompt was compressed
    prefill_s: float
    decode_s: float  # total over the decode steps
    steps: int  # decode forwards
    texts: list[str] = field(default_factory=list)  # every row's
    row_stats: list[CompressionStats] = field(default_factory=list)  # every row's prefill stats
    kept_positions: dict = field(default_factory=dict)  # layer -> [B, Hk, K] prompt positions kept after prefill
    total_s: float = 0.0  # wall time of the whole generate call: what a user waits for
    step_s: list[float] = field(default_factory=list)  # each decode forward's time

    @property
    def decode_ms_per_token(self) -> float:
        return 1000 * self.decode_s / self.steps if self.steps else float("nan")

    @property
    def decode_ms_median(self) -> float:
        """The median decode step in ms: on a shared machine one step that loses the CPU moves the mean by more
        than a 10x smaller cache saves on a small model."""
        return 1000 * float(np.median(self.step_s)) if self.step_s else float("nan")


def run(model, processor, inputs: dict, policy: Policy | None, max_new_tokens: int = 32, **generate_kw) -> RunResult:
    """One greedy generation, compressed by `policy` (None: plain Hugging Face), with prefill and decode times
    taken around the model's forwards."""
    times: list[float] = []
    marks: list[float] = []

    def pre(*_):
        _sync(model)
        marks.append(time.perf_counter())

    def post(*_):
        _sync(model)
        times.append(time.perf_counter() - marks[-1])

    with vlcache.compress(model, policy) if policy is not None else nullcontext() as session:
        # registered inside the session, so that the times enclose its hooks too (the whole-model step after the
        # prompt, VL-Cache's global selection, is part of the prefill)
        handles = [model.register_forward_pre_hook(pre, prepend=True), model.register_forward_hook(post)]
        try:
            with torch.inference_mode():
                _sync(model)
                start = time.perf_counter()
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kw)
                _sync(model)
                total = time.perf_counter() - start
        finally:
            for h in handles:
                h.remove()
    n = inputs["input_ids"].shape[1]
    texts = processor.batch_decode(out[:, n:], skip_special_tokens=True) if processor is not None else [""] * len(out)
    stats, prefill_stats = (session.stats, session.prefill_stats) if session else (None, None)
    rows = list(session.prefill_rows) if session else []
    kept = dict(session.prefill_positions) if session else {}
    return RunResult(
        out[0, n:].tolist(),
        texts[0],
        stats,
        prefill_stats,
        times[0],
        sum(times[1:]),
        len(times) - 1,
        texts,
        rows,
        kept,
        total,
        times[1:],
    )


def _sync(model):
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
