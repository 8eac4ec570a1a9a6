"""The embedded model ships inside the package, loads offline the way a hub checkpoint does, and answers
held-out questions (seeds no training batch drew) with the full cache."""

import collections
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlcache.apps.evaluation.embedded_model import EMBEDDED_DIR, batch_inputs, build_untrained, load_embedded
from vlcache.apps.evaluation.tasks import TASKS, make_example, score
from vlcache.apps.evaluation.tensor_tasks import draw_batch
from vlcache.apps.evaluation.tensor_tasks import processor as task_processor


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
    # falls to chance
    recorded = json.loads((EMBEDDED_DIR / "training.json").read_text())["held_out_accuracy"][f"{task}@8"]
    assert accuracy >= recorded - 0.15, f"{task}: {accuracy:.2f}, training measured {recorded:.2f}"


@pytest.mark.slow
def test_projector_norm_penalty_follows_formula_and_pulls_rms_to_one():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from train_embedded import projector_norm_penalty, train_step

    model = build_untrained(0, layers=1, hidden=32, heads=2, kv_heads=1)
    penalty = projector_norm_penalty(model, 0.5)
    inputs = draw_batch("needle", 2, 4, torch.Generator().manual_seed(0))[0]
    with torch.no_grad():
        model(**inputs)
        got = penalty()
        features = model.get_image_features(pixel_values=inputs["pixel_values"])
    features = torch.cat(list(getattr(features, "pooler_output", features)))  # [tokens, hidden] projector outputs
    assert features.shape == (4 * 2 * 16, 32)
    torch.testing.assert_close(got, 0.5 * features.pow(2).mean(-1).sqrt().log().pow(2).mean())
    opt = torch.optim.Adam(model.model.multi_modal_projector.parameters(), lr=0.02)
    for _ in range(30):  # the penalty (weighted up) moves the projector's output RMS towards 1
        train_step(model, opt, inputs, lambda: 20 * penalty())
    with torch.no_grad():
        model(**inputs)
        assert float(penalty()) < 0.5 * float(got)


@pytest.mark.slow
def test_attention_loss_follows_formula_and_moves_attention_onto_the_target():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from train_embedded import attention_loss, train_step

    model = build_untrained(0, layers=2, hidden=32, heads=2, kv_heads=1)
    assert model.config._attn_implementation == "sdpa"
    inputs, _, targets = draw_batch("lookup", 2, 8, torch.Generator().manual_seed(0), targets=True)
    loss = attention_loss(0.5, 1, targets)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        probs = model(**inputs, output_attentions=True).attentions[1][:, 0]  # [batch, queries, keys] of head 0
    model.set_attn_implementation("sdpa")
    equals = inputs["input_ids"] == task_processor().tokenizer.convert_tokens_to_ids("=")
    assert equals[:, -2].all()  # the query it reads is the "=" that predicts the answer
    want = -0.5 * probs[torch.arange(8), -2, targets].log().mean()
    torch.testing.assert_close(loss([None, probs[:, None]]), want)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(20):  # the loss alone (weighted up) pulls head 0's attention onto the named object's patch
        train_step(model, opt, inputs, attend=attention_loss(20.0, 1, targets))
    assert model.config._attn_implementation == "sdpa"  # eager only for the step: the model saves as it was built
    model.set_attn_implementation("eager")
    with torch.no_grad():
        after = model(**inputs, output_attentions=True).attentions[1][:, 0, -2]
    assert after[torch.arange(8), targets].mean() > 0.5 > probs[torch.arange(8), -2, targets].mean()


def test_lookup_confusions_reads_the_colours_shown_and_counts_every_pair(embedded):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from lookup_confusions import SEED, colours_shown, confusions

    rng = np.random.default_rng(11)
    for _ in range(20):  # describe keeps every object: the colours read from the pixels are those drawn
        example = make_example("describe", 8, rng)
        assert colours_shown(example) == {color for _, color in example.objects.values()}
    model, processor = embedded
    overall, named, pairs = confusions(model, processor, n=12, frames=4, batch=6)
    rng = np.random.default_rng(SEED + 4)  # the same videos: each adds one pair per other colour it shows
    expected = collections.Counter()
    for example in [make_example("lookup", 4, rng) for _ in range(12)]:
        key = example.question.split()[1][0]
        expected.update((key, other) for other in colours_shown(example) - {key})
    assert {pair: count for pair, (_, count) in pairs.items()} == expected
    # the accuracies are the scores of the model's answers, scored again here in one batch of all twelve, for the
    # trained model (it gets these right) and for an untrained one (it gets them wrong)
    rng = np.random.default_rng(SEED + 4)
    examples = [make_example("lookup", 4, rng) for _ in range(12)]
    untrained = build_untrained(0).eval()
    results = {}
    for name, m, got in (("trained", model, (overall, named, pairs)), ("untrained", untrained, None)):
        overall_m, named_m, pairs_m = got or confusions(m, processor, n=12, frames=4, batch=6)
        inputs = batch_inputs(processor, examples, device=m.device)
        with torch.inference_mode():
            out = m.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        right = [score("lookup", t, e.answer) for t, e in zip(texts, examples)]
        assert overall_m == np.mean(right)
        for key, acc in named_m.items():
            assert acc == np.mean([r for r, e in zip(right, examples) if e.question.split()[1][0] == key])
        for (key, other), (acc, _) in pairs_m.items():
            picked = [
                r for r, e in zip(right, examples) if e.question.split()[1][0] == key and other in colours_shown(e)
            ]
            assert acc == np.mean(picked)
        results[name] = overall_m
    assert results["trained"] > 0.8 and results["untrained"] < 0.3
