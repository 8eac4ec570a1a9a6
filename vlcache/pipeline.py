"""Shared by the apps (CLI, captioning, demo, benchmarks): load a model, turn frames into inputs, run one request
with timings. Thin: everything here goes through the public API."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import vlcache

from .policies import Policy
from .stats import CompressionStats

DEFAULT_MODEL = "tiny"


def load(name: str | None = None, *, device: str | None = None, dtype: torch.dtype | None = None):
    """(model, processor) for a hub id or local path; None or "tiny" gives the embedded default.

    The embedded default is a tiny Llava built from a config (random weights) with a hub-free processor.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name in (None, DEFAULT_MODEL):
        from . import tiny

        model = tiny.build("llava").to(device)
        return model, tiny.processor("llava")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(
            name, dtype=dtype or (torch.bfloat16 if device == "cuda" else torch.float32), device_map=device
        )
    except OSError as e:
        raise ValueError(f"cannot load model {name!r}: {e}") from e
    return model.eval(), processor


def frames_inputs(processor, frames, question: str, device=None) -> dict:
    """Model inputs for a question about frames given as a sequence of images, each after a text marker
    ("f0 <image> f1 <image> ... question"), through the processor's chat template when it has one."""
    content = []
    for i in range(len(frames)):
        content += [{"type": "text", "text": f"f{i} "}, {"type": "image"}]
    content.append({"type": "text", "text": question})
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    else:
        token = getattr(processor, "image_token", None) or "<image>"
        text = "".join(c["text"] if c["type"] == "text" else token for c in content)
    inputs = processor(images=list(frames), text=[text], return_tensors="pt")
    return {k: v.to(device) if device is not None and hasattr(v, "to") else v for k, v in inputs.items()}


@dataclass
class RunResult:
    tokens: list[int]  # generated ids
    text: str
    stats: CompressionStats | None  # at the end of generation
    prefill_stats: CompressionStats | None  # right after the prompt was compressed
    prefill_s: float
    decode_s: float  # total over the decode steps
    steps: int  # decode forwards

    @property
    def decode_ms_per_token(self) -> float:
        return 1000 * self.decode_s / self.steps if self.steps else float("nan")


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

    handles = [model.register_forward_pre_hook(pre), model.register_forward_hook(post)]
    try:
        with vlcache.compress(model, policy) if policy is not None else nullcontext() as session:
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kw)
    finally:
        for h in handles:
            h.remove()
    n = inputs["input_ids"].shape[1]
    new = out[0, n:].tolist()
    text = processor.decode(new, skip_special_tokens=True) if processor is not None else ""
    stats, prefill_stats = (session.stats, session.prefill_stats) if session else (None, None)
    return RunResult(new, text, stats, prefill_stats, times[0], sum(times[1:]), len(times) - 1)


def _sync(model):
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
