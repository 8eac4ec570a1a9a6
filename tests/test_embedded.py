"""The embedded model ships inside the package, loads offline the way a hub checkpoint does, and answers
held-out questions (seeds no training batch drew) with the full cache."""

import json

import numpy as np
import pytest
import torch

from vlcache.evaluation.model import EMBEDDED_DIR, batch_inputs, load_embedded
from vlcache.evaluation.tasks import TASKS, make_example, score


@pytest.fixture(scope="module")
def embedded():
    return load_embedded()


def test_files_and_size():
    files = {p.name for p in EMBEDDED_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "training.json"} <= files
    assert sum(p.stat().st_size for p in EMBEDDED_DIR.iterdir()) < 20 * 2**20
    meta = json.loads((EMBEDDED_DIR / "training.json").read_text())
    assert meta["train_seconds"] > 0 and meta["command"].startswith("python scripts/train_embedded.py")


@pytest.mark.parametrize("task", TASKS)
def test_answers_held_out_questions(embedded, task):
    model, processor = embedded
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    rng = np.random.default_rng(3 * 10**6 + TASKS.index(task))
    examples = [make_example(task, 8, rng) for _ in range(24)]
    inputs = batch_inputs(processor, examples)
    width = len(examples[0].answer) + 1
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=width, min_new_tokens=width, do_sample=False)
    texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert all(t.startswith("=") for t in texts)  # the fixed token first: the answer comes from a decode step
    accuracy = sum(score(task, t, e.answer) for t, e in zip(texts, examples)) / len(examples)
    # what training measured on 400 held-out videos, less a margin for 24 examples: a broken load or processor
    # falls to chance; the keyed lookup, which this model has only half learned (0.55), is held to its own level too
    recorded = json.loads((EMBEDDED_DIR / "training.json").read_text())["held_out_accuracy"][f"{task}@8"]
    assert accuracy >= recorded - 0.15, f"{task}: {accuracy:.2f}, training measured {recorded:.2f}"
