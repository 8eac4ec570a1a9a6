"""The four parts (policies/parts/): a new one of each kind is one registered class that combines with every part of
the other kinds; decode-time schedules under other methods' scores; presets by name."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))

from record_policies import IDS, MASK  # noqa: E402
from util import layout_from_ids, prompt_for, real_positions, run_policy  # noqa: E402

import vlcache  # noqa: E402
from vlcache import kernels, testing  # noqa: E402
from vlcache.policies import (  # noqa: E402
    CAKE,
    H2O,
    Composed,
    Selection,
    make_policy,
    preset,
)
from vlcache.policies.parts import (  # noqa: E402
    ALLOCATORS,
    MERGERS,
    SCHEDULES,
    SCORERS,
    Allocator,
    Merger,
    Schedule,
    register_allocator,
    register_merger,
    register_schedule,
)

LAYERS = 4


def _held(cache, li):
    return cache.slot_valid(cache.layers[li])[:, 0].sum(-1)


@pytest.fixture
def new_parts():
    """One new part of each kind, each a single class, removed from the registries afterwards."""

    @register_allocator("halves")
    class Halves(Allocator):  # every layer half of the per-layer budget
        def layer_plan(self, policy, view):
            return policy.plan(view, total=policy.total_budget(view.layout) // 2)

    @register_merger("into_first")
    class IntoFirst(Merger):  # every evicted entry averaged into the first kept one
        def merge(self, policy, view, sel, plan):
            kept = torch.zeros_like(view.slot_valid).scatter_(-1, sel.indices, True)
            evicted = view.slot_valid & ~kept
            assign = torch.zeros_like(view.positions)
            keys, values = kernels.merge_kv(view.keys, view.values, sel.indices, evicted, assign, "average")
            return Selection(sel.indices, keys, values)

    @register_schedule("oldest_out")
    class OldestOut(Schedule):  # holds the prefill's size while decoding: the oldest unprotected entry leaves
        evicts = True

        def start(self, policy, view, plan, sel):
            view.state["oldest_out"] = plan.kept()

        def on_append(self, policy, view):
            protected = view.prompt_mask(policy.protected(view.layout))
            return policy.keep_at_budget(view, view.state["oldest_out"], view.positions.float(), protected)

    yield
    ALLOCATORS.pop("halves")
    MERGERS.pop("into_first")
    SCHEDULES.pop("oldest_out")


@pytest.mark.parametrize("scorer", ["snapkv", "vlcache", "h2o", "cake", "streamingllm"])
def test_a_new_part_of_each_kind_is_one_class_that_combines_with_the_others(new_parts, scorer):
    layout = layout_from_ids(IDS, MASK)
    settings = {"part_settings": {"window": 4}} if scorer in ("snapkv", "cake") else {}
    k = torch.floor(layout.valid.sum(-1).double() * 0.3).long()
    halves = run_policy(
        Composed(budget=0.3, protect=(), scorer=scorer, allocator="halves", **settings), layout, layers=LAYERS
    )
    for li in range(LAYERS):
        assert _held(halves, li).tolist() == (k // 2).tolist()

    # the merger changes what the first kept entry holds and nothing else
    plain = run_policy(Composed(budget=0.3, scorer=scorer, **settings), layout, layers=LAYERS, seed=2)
    merged = run_policy(
        Composed(budget=0.3, scorer=scorer, merger="into_first", **settings), layout, layers=LAYERS, seed=2
    )
    for li in range(LAYERS):
        assert real_positions(plain, li) == real_positions(merged, li)
        a, b = plain.layers[li].keys, merged.layers[li].keys
        assert torch.equal(a[..., 1:, :], b[..., 1:, :]) and not torch.equal(a[..., :1, :], b[..., :1, :])

    # the schedule holds every layer at its prefill size while decoding, the oldest entries leaving for the new ones
    sizes = {}
    held = run_policy(
        Composed(budget=0.3, protect=(), scorer=scorer, schedule="oldest_out", **settings),
        layout,
        layers=LAYERS,
        decode=5,
        on_prefill=lambda cache: sizes.update({li: _held(cache, li).tolist() for li in range(LAYERS)}),
    )
    for li in range(LAYERS):
        assert _held(held, li).tolist() == sizes[li]
        generated = set(range(layout.length, layout.length + 5))
        assert all(generated <= set(head) for row in real_positions(held, li) for head in row)


def test_registering_is_checked(new_parts):
    with pytest.raises(ValueError, match="exists already"):
        register_allocator("halves")
    with pytest.raises(ValueError, match="subclass of vlcache.policies.parts.Merger"):
        register_merger("plain")(object)
    with pytest.raises(ValueError, match="its own score"):
        from vlcache.policies import Policy

        register_scorer = __import__("vlcache.policies.parts", fromlist=["register_scorer"]).register_scorer
        register_scorer("plain")(Policy)
    assert set(SCORERS) >= {"snapkv", "vlcache", "h2o", "lookm", "cake", "elastic", "streamingllm", "random"}


@pytest.mark.parametrize("schedule", ["h2o", "streamingllm", "cake"])
def test_a_decode_schedule_under_another_methods_scores_holds_the_prefill_size(schedule):
    layout = layout_from_ids(IDS, MASK)
    sizes, kept = {}, {}

    def after_prefill(cache):
        sizes.update({li: _held(cache, li).tolist() for li in range(LAYERS)})

    policy = Composed(budget=0.3, protect=(), scorer="vlcache", allocator="preference", schedule=schedule)
    cache = run_policy(policy, layout, layers=LAYERS, decode=6, on_prefill=after_prefill)
    newest = layout.length + 5  # the sixth generated token: every schedule keeps the newest entries
    for li in range(LAYERS):
        assert _held(cache, li).tolist() == sizes[li]
        kept[li] = real_positions(cache, li)
        assert all(newest in head for row in kept[li] for head in row)
        if schedule == "streamingllm":  # and what it drops is the oldest non-sink entries: the first prompt tokens
            assert all(min(p for p in head if p >= 4) > 4 for row in kept[li] for head in row)
    # the prefill is the composition's own (the schedule changes only what happens while decoding)
    prefill = {}
    run_policy(
        Composed(budget=0.3, protect=(), scorer="vlcache", allocator="preference"),
        layout,
        layers=LAYERS,
        on_prefill=lambda c: prefill.update({li: real_positions(c, li) for li in range(LAYERS)}),
    )
    seen = {}
    run_policy(
        policy,
        layout,
        layers=LAYERS,
        on_prefill=lambda c: seen.update({li: real_positions(c, li) for li in range(LAYERS)}),
    )
    assert seen == prefill


def test_the_h2o_schedule_under_other_scores_starts_from_the_prompts_attention():
    """H2O's schedule under VL-Cache's scores adds each step's attention to the prompt rows' sums: a vision token
    that every prompt row looks at stays through six steps that never look at it, while other prompt tokens leave
    (from decode attention alone it would be the first to go)."""
    layout = layout_from_ids(IDS, MASK)
    (B, n), heads, kv_heads, d = layout.modality.shape, 4, 2, 8
    vision = (layout.modality == 1) & layout.valid
    hot = int(vision.all(0).nonzero()[0])  # the first position that is a vision token in both rows
    c = torch.zeros(d)
    c[0] = 4.0  # q . k = 16 / sqrt(8): about 300 times any other key's weight
    g = torch.Generator().manual_seed(0)

    def noise(*shape):
        return 0.1 * torch.randn(*shape, generator=g)

    qkv = []
    for _ in range(LAYERS):
        k = noise(B, kv_heads, n, d)
        k[:, :, hot] += c
        qkv.append((noise(B, heads, n, d) + c, k, noise(B, kv_heads, n, d)))

    def decode_qkv(step, li):  # the new rows look away from it
        return noise(B, heads, 1, d) - c, noise(B, kv_heads, 1, d), noise(B, kv_heads, 1, d)

    prefill = {}
    policy = Composed(budget=0.3, protect=(), scorer="vlcache", allocator="preference", schedule="h2o")
    on_prefill = lambda cache: prefill.update({li: real_positions(cache, li) for li in range(LAYERS)})  # noqa: E731
    cache = run_policy(policy, layout, layers=LAYERS, heads=heads, kv_heads=kv_heads, d=d, qkv=qkv, decode=6,
                       decode_qkv=decode_qkv, on_prefill=on_prefill)  # fmt: skip
    for li in range(LAYERS):
        after = real_positions(cache, li)
        for b in range(B):
            for h in range(kv_heads):
                assert hot in prefill[li][b][h], f"layer {li}: VL-Cache's cut left out the hot token"
                assert hot in after[b][h], f"layer {li}, row {b}, KV head {h}: the hot token left while decoding"
                left = set(prefill[li][b][h]) - set(after[b][h])
                assert left and all(p < n for p in left)  # the schedule did evict prompt tokens


def test_the_elastic_schedule_keeps_its_fraction_of_the_tokens_seen():
    layout = layout_from_ids(IDS, MASK)
    cache = run_policy(
        Composed(budget=0.5, scorer="snapkv", schedule="elastic", part_settings={"window": 4}),
        layout,
        layers=LAYERS,
        decode=6,
    )
    seen = layout.valid.sum(-1) + 6
    for li in range(LAYERS):
        assert _held(cache, li).tolist() == torch.floor(0.5 * seen.double()).long().tolist()


def test_one_methods_scorer_and_schedule_share_one_attention_pass(monkeypatch):
    calls = []
    sums = H2O._sums
    monkeypatch.setattr(H2O, "_sums", lambda self, view: calls.append(view.layer) or sums(self, view))
    run_policy(preset("h2o", budget=0.3), layout_from_ids(IDS, MASK), layers=LAYERS)
    assert calls == list(range(LAYERS))


def test_presets_by_name():
    p = preset("cake", budget=0.1, window=8, cascading=False)
    assert (p.scorer, p.allocator, p.schedule, p.cascading, p.part_settings) == (
        "cake",
        "preference",
        "cake",
        False,
        {"window": 8},
    )
    assert isinstance(p._scorer, CAKE) and p.decodes and not preset("snapkv", budget=0.1).decodes
    with pytest.raises(ValueError, match="no preset 'fastv'"):
        preset("fastv", budget=0.1)
    with pytest.raises(ValueError, match="no part of this composition has the setting 'beta'"):
        preset("snapkv", budget=0.1, beta=3)


def _by_modality(stats):
    return [(s.kept["image"] + s.kept["video"], s.kept["text"], s.kept["generated"]) for s in stats.layers]


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "qwen2_vl"])
@pytest.mark.parametrize(
    "amounts", [{"budget": 0.4}, {"vision_budget": 0.2}, {"vision_budget": 0.2, "text_budget": 0.5}]
)
def test_a_decode_schedule_in_generate(tiny_model, family, amounts):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    policy = make_policy("compose", **amounts, scorer="vlcache", allocator="preference", schedule="h2o")
    with vlcache.compress(model, policy) as session:
        model.generate(**inputs, do_sample=False, max_new_tokens=6)  # 5 decode steps append to the cache
    after_prefill, at_end = _by_modality(session.prefill_stats), _by_modality(session.stats)
    for (vision, text, _), (vision_end, text_end, generated) in zip(after_prefill, at_end):
        if "budget" in amounts:  # held at the prefill's size in all, any modality leaving for the new tokens
            assert vision_end + text_end + generated == vision + text and vision_end + text_end < vision + text
        elif "text_budget" in amounts:  # each modality at its own: prompt text leaves (H2O's recent window keeps
            assert vision_end == vision and text_end <= text and generated == 5  # the new tokens)
        else:  # the text is not held: nothing leaves, the generated tokens join
            assert (vision_end, text_end, generated) == (vision, text, 5)


@pytest.mark.parametrize(
    "settings",
    [{"lookahead": 1}, {"lookahead": 2, "lookahead_draft": True}, {"schedule": "h2o"}, {"schedule": "cake"}],
    ids=str,
)
def test_a_prompt_the_preference_allocator_leaves_whole(tiny_model, settings):
    # CAKE's rule leaves a prompt that fits its budget plus its window whole: lookahead then has nothing to wait
    # for and a decode schedule nothing to hold, and generate is plain generate
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    plain = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    policy = Composed(vision_budget=1.0, scorer="vlcache", allocator="preference", **settings)
    with vlcache.compress(model, policy):
        out = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    assert torch.equal(out, plain)
