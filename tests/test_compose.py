"""Policies combined from parts (`Composed`): the published methods as compositions, and new combinations."""

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))

from record_policies import IDS, MASK  # noqa: E402
from util import layout_from_ids, prompt_for, real_positions, run_policy  # noqa: E402

import vlcache  # noqa: E402
from vlcache import testing  # noqa: E402
from vlcache.policies import H2O, LOOKM, Composed, PyramidKV, SnapKV, VLCache, make_policy, parse_settings  # noqa: E402
from vlcache.policies.compose import ALLOCATORS, MERGERS, SCORERS  # noqa: E402

LAYERS = 4


PRESETS = [
    (lambda kw: SnapKV(window=4, **kw), {"scorer": "snapkv", "part_settings": {"window": 4}}),
    (
        lambda kw: PyramidKV(window=4, **kw),
        {"scorer": "snapkv", "allocator": "pyramid", "part_settings": {"window": 4}},
    ),
    (lambda kw: VLCache(**kw), {"scorer": "vlcache", "allocator": "density"}),
    (lambda kw: VLCache(**kw), {"scorer": "vlcache", "allocator": "density", "cascading": True}),
    (lambda kw: LOOKM(**kw), {"scorer": "lookm", "merger": "lookm"}),
    (
        lambda kw: LOOKM(merge="average", **kw),
        {"scorer": "lookm", "merger": "lookm", "part_settings": {"merge": "average"}},
    ),
    (lambda kw: H2O(**kw), {"scorer": "h2o"}),  # its prefill; H2O also evicts while decoding, a composition does not
]


@pytest.mark.parametrize("published, parts", PRESETS, ids=[str(p) for _, p in PRESETS])
@pytest.mark.parametrize("amounts", [{"budget": 0.3}, {"vision_budget": 0.2}, {"budget": 0.1, "frame_min": 2}], ids=str)
def test_a_published_method_is_its_composition(published, parts, amounts):
    layout = layout_from_ids(IDS, MASK)
    for seed in range(2):
        a = run_policy(published(amounts), layout, layers=LAYERS, seed=seed)
        b = run_policy(Composed(**parts, **amounts), layout, layers=LAYERS, seed=seed)
        for li in range(LAYERS):
            assert real_positions(a, li) == real_positions(b, li)
            torch.testing.assert_close(a.layers[li].keys, b.layers[li].keys)  # merged keys included


COMBOS = [
    {"scorer": s, "allocator": a, "merger": m}
    for s, a, m in itertools.product(SCORERS, ALLOCATORS, MERGERS)
    if not (a == "pyramid" and s in ("streamingllm", "random"))  # keeps the combination count down
]


def _combo(parts):
    """The fast set: every scorer alone, and every split and merging under VL-Cache's scores; the full suite: all."""
    fast = parts["scorer"] == "vlcache" or (parts["allocator"], parts["merger"]) == ("uniform", "none")
    return pytest.param(parts, id=str(parts), marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("parts", [_combo(c) for c in COMBOS])
def test_every_combination_keeps_exactly_the_model_wide_budget(parts):
    # protect=() so that every kept token comes out of the budget: over the layers, L x the per-layer total
    layout = layout_from_ids(IDS, MASK)
    k = torch.floor(layout.valid.sum(-1).double() * 0.3).long()
    cache = run_policy(Composed(budget=0.3, protect=(), **parts), layout, layers=LAYERS, seed=5)
    held = sum(cache.slot_valid(cache.layers[li])[:, 0].sum(-1) for li in range(LAYERS))
    assert held.tolist() == (LAYERS * k).tolist()


def test_budgets_move_between_layers_with_a_layer_splitting_allocator():
    layout = layout_from_ids(IDS, MASK)
    # (random tensors give every layer about the same density: VL-Cache's own tests cover the density split)
    for allocator in ("preference", "pyramid"):
        cache = run_policy(
            Composed(budget=0.3, protect=(), scorer="h2o", allocator=allocator), layout, layers=LAYERS, seed=1
        )
        sizes = {cache.slot_valid(cache.layers[li])[0, 0].sum().item() for li in range(LAYERS)}
        assert len(sizes) > 1, allocator


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "qwen2_vl"])
@pytest.mark.parametrize(
    "parts",
    [
        {"scorer": "vlcache", "allocator": "preference", "merger": "lookm"},
        # CAKE always keeps its window: 4 rows, so that on these short prompts it does not reach the vision tokens
        {"scorer": "cake", "allocator": "density", "cascading": True, "part_settings": {"window": 4}},
        {"scorer": "h2o", "allocator": "pyramid", "merger": "elastic"},
    ],
    ids=str,
)
def test_combinations_in_generate(tiny_model, family, parts):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    plain = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    with vlcache.compress(model, Composed(vision_budget=1.0, **parts)):
        out = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    assert torch.equal(out, plain)  # keep-all is the identity
    with vlcache.compress(model, Composed(vision_budget=0.2, **parts)) as session:
        model.generate(**inputs, do_sample=False, max_new_tokens=6)
    stats = session.prefill_stats
    vision = stats.prompt["image"] + stats.prompt["video"]
    kept = sum(s.kept["image"] + s.kept["video"] for s in stats.layers)
    assert kept == pytest.approx(len(stats.layers) * int(0.2 * vision), abs=0.5 * len(stats.layers))


def test_compositions_by_name_and_from_settings_strings():
    policy = make_policy("compose", vision_budget=0.1, **parse_settings(["scorer=vlcache", "allocator=preference",
                                                                          "merger=lookm", "part_settings={'window': 8}"]))  # fmt: skip
    assert (policy.scorer, policy.allocator, policy.merger, policy._allocator.method.window) == (
        "vlcache",
        "preference",
        "lookm",
        8,
    )


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"scorer": "fastv"}, "scorer='fastv' not understood"),
        ({"allocator": "adakv"}, "allocator='adakv' not understood"),
        ({"merger": "mean"}, "merger='mean' not understood"),
        ({"part_settings": {"beta": 3}}, "no part of this composition has the setting 'beta'"),
        ({"allocator": "uniform", "cascading": True}, "density or preference"),
        ({"allocator": "density", "cascading": True, "merger": "lookm"}, "merged entries"),
        ({"scorer": "h2o", "lookahead": 1}, "does not score by attention from a set of rows"),
        ({"lookahead": 1, "merger": "lookm"}, "without cascading, a merger or a decode schedule"),
        ({"lookahead": 1, "schedule": "h2o"}, "without cascading, a merger or a decode schedule"),
        ({"schedule": "every"}, "schedule='every' not understood"),
        ({"part_settings": {"evict_every": 2}}, "no part of this composition has the setting 'evict_every'"),
    ],
)
def test_bad_compositions_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        Composed(budget=0.1, **settings)


@pytest.mark.parametrize("allocator", ["uniform", "pyramid", "density", "preference"])
def test_lookahead_in_a_composition_is_lookahead_in_its_scorer(allocator):
    # VL-Cache's scores with density and lookahead are VL-Cache with lookahead; the other splits keep their totals
    layout = layout_from_ids(IDS, MASK)
    looked = run_policy(
        Composed(budget=0.3, protect=(), scorer="vlcache", allocator=allocator, lookahead=1),
        layout,
        layers=LAYERS,
        decode=2,
    )
    if allocator == "density":
        ref = run_policy(VLCache(budget=0.3, protect=(), lookahead=1), layout, layers=LAYERS, decode=2)
        assert all(real_positions(looked, li) == real_positions(ref, li) for li in range(LAYERS))
    k = torch.floor(layout.valid.sum(-1).double() * 0.3).long()
    held = sum(looked.slot_valid(looked.layers[li])[:, 0].sum(-1) for li in range(LAYERS))
    assert held.tolist() == (LAYERS * (k + 2)).tolist()  # the budget, and both generated tokens in every layer


def test_a_new_scorer_is_one_class_that_combines_with_every_allocator():
    from dataclasses import dataclass

    from vlcache.policies import Policy
    from vlcache.policies.compose import SCORERS, register_scorer

    @register_scorer("latest")
    @dataclass(kw_only=True)
    class Latest(Policy):  # the most recent tokens first: StreamingLLM without sinks, written as a scorer
        def score(self, view):
            return view.positions.float()

    try:
        layout = layout_from_ids(IDS, MASK)
        for allocator in ALLOCATORS:
            cache = run_policy(Composed(budget=0.3, protect=(), scorer="latest", allocator=allocator), layout, layers=2)
            held = [real_positions(cache, li) for li in range(2)]
            for layer in held:
                for row, n in zip(layer, layout.valid.sum(-1).tolist()):
                    for head in row:  # the newest tokens of the row, as many as the layer's share
                        assert head == list(range(layout.length - len(head), layout.length)) and len(head) <= n
        with pytest.raises(ValueError, match="exists already"):
            register_scorer("latest")
        with pytest.raises(ValueError, match="its own score"):
            register_scorer("plain")(Policy)
    finally:
        SCORERS.pop("latest", None)


@pytest.mark.parametrize("lookahead", [0, 1])
def test_one_methods_scorer_and_allocator_share_one_attention_pass(monkeypatch, lookahead):
    # VL-Cache's scores and densities come from the same post-vision attention: one pass a layer, not two
    calls = []
    measure = VLCache.measure
    monkeypatch.setattr(VLCache, "measure", lambda self, view: calls.append(view.layer) or measure(self, view))
    layout = layout_from_ids(IDS, MASK)
    policy = Composed(budget=0.3, scorer="vlcache", allocator="density", lookahead=lookahead)
    run_policy(policy, layout, layers=LAYERS, decode=lookahead)
    assert calls == list(range(LAYERS))
