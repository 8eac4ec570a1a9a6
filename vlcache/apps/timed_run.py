"""One greedy generation with prefill and decode times taken around the model's forwards (the CLI, captioner, demo
and benchmarks measure through it). Thin: it goes through the public API."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

import vlcache

from ..compression_stats import CompressionStats
from ..policies import Policy


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
    total_s: float = 0.0  # wall time of the whole generate call: what a user waits for
    step_s: list[float] = field(default_factory=list)  # each decode forward's time
    session: object = None  # the vlcache session that compressed it (None: plain Hugging Face)

    @property
    def row_stats(self) -> list[CompressionStats]:
        """Every row's prefill stats (worked out when first read: the benchmarks never ask)."""
        return list(self.session.prefill_rows) if self.session is not None else []

    @property
    def kept_positions(self) -> dict:
        """layer -> [B, Hk, K] prompt positions kept after prefill, on the CPU (worked out when first read)."""
        return dict(self.session.prefill_positions) if self.session is not None else {}

    @property
    def decode_ms_per_token(self) -> float:
        return 1000 * self.decode_s / self.steps if self.steps else float("nan")

    @property
    def decode_ms_median(self) -> float:
        """The median decode step in ms: on a shared machine one step that loses the CPU moves the mean by more
        than a 10x smaller cache saves on a small model."""
        return 1000 * float(np.median(self.step_s)) if self.step_s else float("nan")


def run(
    model,
    processor,
    inputs: dict,
    policy: Policy | None,
    max_new_tokens: int = 32,
    compile: bool = False,
    **generate_kw,
) -> RunResult:
    """One greedy generation, compressed by `policy` (None: plain Hugging Face), with prefill and decode times
    taken around the model's forwards; `compile`: the decode steps compiled (`vlcache.compress(..., compile=True)`)."""
    times: list[float] = []
    marks: list[float] = []

    def pre(*_):
        _sync(model)
        marks.append(time.perf_counter())

    def post(*_):
        _sync(model)
        times.append(time.perf_counter() - marks[-1])

    with vlcache.compress(model, policy, compile=compile) if policy is not None else nullcontext() as session:
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
    return RunResult(
        out[0, n:].tolist(),
        texts[0],
        stats,
        prefill_stats,
        times[0],
        sum(times[1:]),
        len(times) - 1,
        texts,
        total,
        times[1:],
        session,
    )


def _sync(model):
    dev = next(model.parameters()).device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
