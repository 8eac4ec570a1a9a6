"""VL-Cache with `cascading`: each layer cut when seen, to its density share among the layers seen so far."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))

from record_policies import IDS, MASK  # noqa: E402
from util import layout_from_ids, real_positions, run_policy  # noqa: E402

from vlcache.policies import VLCache  # noqa: E402

LAYERS = 6


SETTINGS = [
    {"budget": 0.3},
    {"budget": 30},  # above the 21 protected tokens (17 was below: nothing scored)
    {"budget": 0.05},
    {"vision_budget": 0.2},
    {"vision_budget": 0.15, "text_budget": 0.5},
    {"budget": 0.1, "frame_min": 2},
    {"budget": 0.3, "exact": False},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_the_last_cut_keeps_what_the_paper_keeps(settings):
    # a share only shrinks as layers arrive, and scores move with the kept slots: the top of a top is the top
    layout = layout_from_ids(IDS, MASK)
    for seed in range(4):
        paper = run_policy(VLCache(**settings), layout, layers=LAYERS, seed=seed)
        cascaded = run_policy(VLCache(cascading=True, **settings), layout, layers=LAYERS, seed=seed)
        for li in range(LAYERS):
            assert real_positions(cascaded, li) == real_positions(paper, li), f"seed {seed}, layer {li}"


@pytest.mark.parametrize("cascading", [False, True])
def test_the_cache_never_holds_more_than_the_model_budget_plus_the_current_layer(cascading):
    layout = layout_from_ids(IDS, MASK)
    n = layout.valid.sum(-1)  # [B]
    budget = 0.2
    model_total = LAYERS * (n.double() * budget).floor().long()  # L x the per-layer budget, per row
    held = []

    def after_layer(cache, li):
        held.append(sum(cache.slot_valid(cache.layers[j])[:, 0].sum(-1) for j in range(li + 1)))

    # protect=(): the protected markers and question would be kept above any share, in every layer
    policy = VLCache(budget=budget, protect=(), cascading=cascading)
    run_policy(policy, layout, layers=LAYERS, on_layer=after_layer)
    for li, h in enumerate(held):
        if cascading:  # every layer seen so far (the current one too) is already within its share
            assert bool((h <= model_total).all()), f"after layer {li}: {h.tolist()} > {model_total.tolist()}"
        elif li < LAYERS - 1:  # the paper's schedule: whole until the last layer's density is known
            assert h.tolist() == ((li + 1) * n).tolist()


def test_a_cascaded_layer_is_cut_when_it_is_seen():
    layout = layout_from_ids(IDS, MASK)
    n = layout.valid.sum(-1)
    sizes = []
    run_policy(
        VLCache(budget=0.1, cascading=True),
        layout,
        layers=LAYERS,
        on_layer=lambda cache, li: sizes.append(cache.slot_valid(cache.layers[li])[:, 0].sum(-1)),
    )
    assert all(bool((s < n).all()) for s in sizes)


def test_the_high_water_mark_in_generate(tiny_model):
    # what the cache held at most during the request (CompressionStats.kv_bytes_peak): the paper's VL-Cache holds
    # every layer whole until the last one is seen, the cascaded one at most the model's budget plus one whole layer
    import vlcache
    from vlcache import testing

    model = tiny_model("llava")
    inputs = testing.make_inputs(model, ["ab", testing.IMAGE, "cd", testing.IMAGE, "what is it?"]).inputs
    peaks = {}
    for name, policy in (
        ("full", VLCache(vision_budget=1.0)),
        ("paper", VLCache(vision_budget=0.1)),
        ("cascading", VLCache(vision_budget=0.1, cascading=True)),
    ):
        with vlcache.compress(model, policy) as session:
            model.generate(**inputs, do_sample=False, max_new_tokens=2)
        peaks[name] = session.prefill_stats.kv_bytes_peak
        kept = session.prefill_stats.kv_bytes
    layers = model.config.text_config.num_hidden_layers
    one_layer = peaks["full"] / layers
    assert peaks["paper"] == peaks["full"]
    assert peaks["cascading"] <= kept + one_layer
    assert peaks["cascading"] < 0.8 * peaks["full"]
