"""Judging compression: task accuracy of the embedded model, and fidelity measures that work on any model.

- `accuracy(...)`: exact-match accuracy on held-out examples of a task, under a policy (None: the full cache).
- `KeepVision`: an oracle policy that keeps all text and a given set of vision tokens: with none, the floor (the
  answer must not be recoverable from text alone); with the answer's own tokens, the ceiling.
- `kv_ratio(...)`: the KV bytes a policy keeps after the prompt, as a share of the full cache's.
- `fidelity(...)`: agreement of greedy tokens with the full-cache output, and KL(full || compressed) of the
  next-token distributions while both are fed the full-cache tokens (teacher forcing).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import vlcache

from ...policies import LayerView, Plan, Policy
from .embedded_model import batch_inputs
from .tasks import Example, make_example, score


@dataclass(kw_only=True)
class KeepVision(Policy):
    """Oracle: keeps every text token and exactly the vision tokens in `mask` ([B, n], prompt positions)."""

    mask: torch.Tensor | None = None
    needs_budget = False
    name = "oracle"

    def score(self, view: LayerView) -> torch.Tensor:
        return torch.zeros(view.slot_valid.shape, device=view.keys.device)

    def plan(self, view: LayerView, **kw) -> Plan:
        layout = view.layout
        keep = layout.text | (self.mask.to(layout.valid.device) & layout.vision)
        return Plan(keep & layout.valid, [])


def answer_mask(layout, examples: list[Example]) -> torch.Tensor:
    """[B, n] the vision tokens that hold each example's answer (frame f, patch p -> span f's token p)."""
    mask = torch.zeros_like(layout.valid)
    for b, (sample, ex) in enumerate(zip(layout.samples, examples)):
        for frame, patch in ex.answer_patches():
            mask[b, sample.spans[frame].start + patch] = True
    return mask


def _examples(task: str, frames: int, n: int, seed: int) -> list[Example]:
    rng = np.random.default_rng(seed)
    return [make_example(task, frames, rng) for _ in range(n)]


def _generate(model, inputs, policy, width, **kw):
    with vlcache.compress(model, policy) if policy is not None else nullcontext():
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=width, min_new_tokens=width, do_sample=False, **kw)


def accuracy(
    model, processor, task: str, frames: int, policy: Policy | str | None, n: int = 100, seed: int = 0, batch: int = 50
) -> float:
    """Accuracy ("=" then the answer; describe per frame). `policy` may be "floor" or "ceiling" for the oracles."""
    examples = _examples(task, frames, n, seed)
    right = 0
    for lo in range(0, n, batch):
        chunk = examples[lo : lo + batch]
        inputs = batch_inputs(processor, chunk, device=model.device)
        active = policy
        if policy in ("floor", "ceiling"):
            from ...modality import layout_from_inputs

            layout = layout_from_inputs(model.config, inputs)
            mask = answer_mask(layout, chunk) if policy == "ceiling" else torch.zeros_like(layout.valid)
            active = KeepVision(mask=mask, protect=("markers", "question"))
        width = len(chunk[0].answer) + 1
        out = _generate(model, inputs, active, width)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        right += sum(score(task, t, e.answer) for t, e in zip(texts, chunk))
    return right / n


def merged_share(model, processor, task: str, frames: int, policy: Policy, n: int = 50, seed: int = 0) -> float:
    """The share of the prompts' vision tokens that `policy`'s temporal merging removed before the model."""
    examples = _examples(task, frames, n, seed)
    inputs = batch_inputs(processor, examples, device=model.device)
    with vlcache.compress(model, policy) as session:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    stats = session.prefill_stats
    vision = stats.prompt["image"] + stats.prompt["video"]
    return sum(stats.merged.values()) / vision if vision else 0.0


def kv_ratio(model, inputs: dict, policy: Policy) -> float:
    """KV bytes the cache holds right after the prompt (codes, scales and zero points of a quantized one) over what
    the full cache holds for the same prompts."""
    with vlcache.compress(model, policy) as session:
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    return session.prefill_stats.kv_ratio


class _Recorder(LogitsProcessor):
    """Records each step's log-probabilities and, if given tokens, forces them (teacher forcing)."""

    def __init__(self, forced: torch.Tensor | None = None):
        self.forced = forced
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.logps.append(torch.log_softmax(scores.float(), -1))
        if self.forced is None:
            return scores
        tok = self.forced[:, len(self.logps) - 1]
        return torch.full_like(scores, float("-inf")).scatter_(1, tok[:, None], 0.0)


def fidelity(model, inputs: dict, policy: Policy, steps: int, reference: tuple | None = None) -> dict:
    """{"agreement": share of greedy tokens equal to the full cache's, "kl": mean KL(full || compressed) per step}.
    `reference` = (tokens, log-probs) of the full cache, computed once and reused across policies."""
    n = inputs["input_ids"].shape[1]
    if reference is None:
        rec = _Recorder()
        full = _generate(model, inputs, None, steps, logits_processor=LogitsProcessorList([rec]))[:, n:]
        reference = (full, torch.stack(rec.logps, 1))
    full, full_logp = reference
    free = _generate(model, inputs, policy, steps)[:, n:]
    rec = _Recorder(forced=full)
    _generate(model, inputs, policy, steps, logits_processor=LogitsProcessorList([rec]))
    logp = torch.stack(rec.logps, 1)
    p = full_logp.exp()
    kl = torch.where(p > 0, p * (full_logp - logp), 0.0).sum(-1)  # [B, steps]; 0 log 0 = 0 (tokens masked in both)
    return {"agreement": float((free == full).float().mean()), "kl": float(kl.mean()), "reference": reference}
