"""Lookahead without waiting (`lookahead_draft`): drafted tokens' queries join the scoring rows before the first step."""

import pytest
import torch
from util import prompt_for

import vlcache
from vlcache import testing
from vlcache.policies import Composed, SnapKV, VLCache

FAMILIES = ["llava", "llava_onevision", "qwen2_vl"]


def _generate(model, inputs, policy, new=6):
    with vlcache.compress(model, policy) as session:
        out = model.generate(**inputs, do_sample=False, max_new_tokens=new)
    return out, session


@pytest.mark.parametrize("family", FAMILIES)
def test_drafts_over_the_whole_prompt_are_the_real_tokens_and_keep_all_is_the_identity(tiny_model, family):
    # with every entry kept, the provisional cut is the whole prompt: a correct draft (positions, masks, the roll
    # back) then drafts exactly what generate goes on to produce, and the output is the plain one
    model = tiny_model(family)
    rows = [prompt_for(family), ["z", *prompt_for(family, "what is that one?")]]  # two lengths: a padded batch
    for prompt in (rows[0], rows):
        inputs = testing.make_inputs(model, prompt).inputs
        n = inputs["input_ids"].shape[1]
        plain = model.generate(**inputs, do_sample=False, max_new_tokens=6)
        out, session = _generate(model, inputs, VLCache(vision_budget=1.0, lookahead=3, lookahead_draft=True))
        assert torch.equal(out, plain)
        assert torch.equal(session.last_cache.drafted, plain[:, n : n + 3])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["vlcache", "snapkv", "compose"])
def test_a_drafting_policy_keeps_its_budget_and_drops_the_drafts(tiny_model, family, policy):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    make = {
        "vlcache": lambda **kw: VLCache(vision_budget=0.2, **kw),
        "snapkv": lambda **kw: SnapKV(vision_budget=0.2, window=4, **kw),
        "compose": lambda **kw: Composed(vision_budget=0.2, scorer="vlcache", allocator="preference", **kw),
    }[policy]
    _, waited = _generate(model, inputs, make())
    out, drafted = _generate(model, inputs, make(lookahead=2, lookahead_draft=True))
    # the same budget as the policy without lookahead, cut before the first step: the prompt's compression holds
    # no generated token, and the cache at the end holds exactly the prompt's kept entries plus what was fed back
    kept = [s.total for s in drafted.prefill_stats.layers]
    assert kept == [s.total for s in waited.prefill_stats.layers]
    at_end = [s.total for s in drafted.stats.layers]
    assert at_end == [k + out.shape[1] - inputs["input_ids"].shape[1] - 1 for k in kept]
    assert drafted.last_cache.drafted.shape == (1, 2)


def test_the_drafts_change_what_is_kept(tiny_model):
    # the draft rows weigh like generated rows: scored by them alone (share 1.0), the kept vision tokens differ from
    # the prompt rows' choice on this prompt
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    _, alone = _generate(model, inputs, VLCache(vision_budget=0.1))
    _, drafted = _generate(
        model, inputs, VLCache(vision_budget=0.1, lookahead=2, lookahead_share=1.0, lookahead_draft=True)
    )
    a, b = alone.prefill_positions, drafted.prefill_positions
    assert any(not torch.equal(a[li], b[li]) for li in a)


def test_the_cut_weighs_every_drafts_row(tiny_model, monkeypatch):
    """Three drafts: each one attends over the cut that the rows so far give (its own included), and the final cut
    weighs all three rows summed; a draft that replaced the rows before it would leave only the last one's."""
    from vlcache.policies.base import Policy

    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    seen, cut = {}, {}
    real_keep, real_cut = Policy.provisional_keep, Policy.lookahead_cut

    def provisional_keep(self, view, gen=None, steps=0):
        seen.setdefault(view.layer, []).append((steps, gen.clone()))
        return real_keep(self, view, gen, steps)

    def lookahead_cut(self, view, gen, steps):
        cut[view.layer] = (steps, gen.clone())
        return real_cut(self, view, gen, steps)

    monkeypatch.setattr(Policy, "provisional_keep", provisional_keep)
    monkeypatch.setattr(Policy, "lookahead_cut", lookahead_cut)
    _generate(model, inputs, VLCache(vision_budget=0.2, lookahead=3, lookahead_draft=True))
    assert cut and cut.keys() == seen.keys()
    for li, drafts in seen.items():
        assert [steps for steps, _ in drafts] == [1, 2, 3], f"layer {li}"
        T0 = cut[li][1].shape[-1]
        rows = [gen[..., :T0] for _, gen in drafts]
        for before, after in zip(rows, rows[1:]):  # each draft adds its row's attention over the prompt
            added = after - before
            assert (added >= -1e-6).all() and (added.sum(-1) > 0.05).all(), f"layer {li}"
            assert (added.sum(-1) <= 1 + 1e-5).all()  # one row's attention: at most all of it on the prompt
        steps, final = cut[li]
        assert steps == 3 and torch.allclose(final, rows[-1]), f"layer {li}: the cut is not all three rows"


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"lookahead_draft": True}, "set lookahead >= 1"),
        ({"lookahead": 1, "lookahead_draft": "yes"}, "True or False"),
        ({"lookahead": 1, "lookahead_draft": True, "vision_bits": 4}, "full-precision"),
    ],
)
def test_bad_draft_settings_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        VLCache(vision_budget=0.1, **settings)


def test_a_model_with_sliding_window_layers_is_refused(tiny_model):
    model = tiny_model("gemma3")
    with pytest.raises(ValueError, match="sliding-window layers"):
        vlcache.attach(model, VLCache(vision_budget=0.1, lookahead=1, lookahead_draft=True))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_draft_is_lookahead_one(tiny_model, family):
    # a single draft is the prompt's next token, whose row joins before any layer attends: the cut, and so the
    # output, of `lookahead=1`, which cuts each layer right before the first step's attention
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    out_wait, wait = _generate(model, inputs, VLCache(vision_budget=0.1, lookahead=1))
    out_draft, draft = _generate(model, inputs, VLCache(vision_budget=0.1, lookahead=1, lookahead_draft=True))
    assert torch.equal(out_draft, out_wait)
    a, b = wait.prefill_positions, draft.prefill_positions
    n = inputs["input_ids"].shape[1]
    for li in a:  # (the waiting cut also holds the generated token, at position n)
        assert torch.equal(a[li].masked_select(a[li] < n), b[li].masked_select(b[li] < n))


def test_drafting_then_the_frozen_decode_of_compile(tiny_model):
    # the drafts run eagerly before generate's first step; the steps after go through the frozen static cache
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    policy = VLCache(vision_budget=0.2, lookahead=2, lookahead_draft=True)
    eager, _ = _generate(model, inputs, policy)
    with vlcache.compress(model, policy, compile=True) as session:
        session.decode.capture = False  # the frozen steps uncompiled: the same cache path, no compile time
        out = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    assert session.decode.steps > 0
    assert torch.equal(out, eager)
