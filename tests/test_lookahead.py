"""Lookahead scoring: the prompt stays whole for g generated tokens, whose queries join the scoring rows."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))

from record_policies import IDS, MASK  # noqa: E402
from util import layout_from_ids, real_positions, run_policy, view_for  # noqa: E402

from vlcache import kernels  # noqa: E402
from vlcache.policies import H2O, Plan, PyramidKV, SnapKV, VLCache  # noqa: E402


def real_counts(cache, li):
    return cache.slot_valid(cache.layers[li])[:, 0].sum(-1).tolist()


@pytest.mark.parametrize(
    "make", [lambda **kw: VLCache(budget=0.3, **kw), lambda **kw: PyramidKV(vision_budget=0.2, window=4, **kw)]
)
def test_the_prompt_stays_whole_for_g_tokens_then_keeps_its_budget_and_what_was_generated(make):
    layout = layout_from_ids(IDS, MASK)
    n = layout.valid.sum(-1).tolist()
    plain = run_policy(make(), layout, layers=3)
    sizes = []
    run_policy(make(lookahead=2), layout, layers=3, decode=3, on_step=lambda c, s: sizes.append(real_counts(c, 1)))
    assert sizes[0] == [m + 1 for m in n]  # step 1 of 2: still whole
    assert sizes[1] == [k + 2 for k in real_counts(plain, 1)]  # the cut: the same budget, plus both generated
    assert sizes[2] == [k + 3 for k in real_counts(plain, 1)]


def test_lookahead_zero_is_no_lookahead():
    """lookahead=0 (the default) cuts at the prompt: the budget at once, never the prompt held whole for later
    rows (comparing it with the default alone would compare a policy with itself)."""
    layout = layout_from_ids(IDS, MASK)
    n = layout.valid.sum(-1).tolist()
    for policy in (VLCache(budget=0.2, lookahead=0), SnapKV(budget=0.2, window=4, lookahead=0)):  # two paths
        sizes = []  # layer 1's real tokens after the prefill, then after each decode step
        record = lambda c, *_, sizes=sizes: sizes.append(real_counts(c, 1))  # noqa: E731
        run_policy(policy, layout, layers=3, seed=2, decode=2, on_prefill=record, on_step=record)
        kept = sizes[0]
        assert all(k < m / 2 for k, m in zip(kept, n)), (policy.name, kept, n)  # cut: about a fifth, the text
        assert sizes[1:] == [[k + 1 for k in kept], [k + 2 for k in kept]], policy.name  # the cut, plus what came


def test_share_zero_keeps_what_the_prompt_rows_chose():
    # the generated rows weigh nothing: the same prompt tokens as without lookahead, the generated one on top
    layout = layout_from_ids(IDS, MASK)
    for policy in (VLCache, SnapKV):
        kw = {"budget": 0.3} if policy is VLCache else {"budget": 0.3, "window": 4}
        plain = run_policy(policy(**kw), layout, layers=2, seed=4)
        looked = run_policy(policy(lookahead=1, lookahead_share=0.0, **kw), layout, layers=2, seed=4, decode=1)
        n = layout.length
        for li in range(2):
            got = [[[p for p in head if p < n] for head in row] for row in real_positions(looked, li)]
            assert got == real_positions(plain, li), f"{policy.__name__}, layer {li}"


def test_share_one_keeps_the_top_of_the_generated_rows_attention():
    layout = layout_from_ids(IDS, MASK)
    B, heads, kv_heads, d = 2, 4, 2, 8
    g = torch.Generator().manual_seed(7)
    q_gen = torch.randn(B, heads, 1, d, generator=g) * 3
    k_gen, v_gen = torch.randn(B, kv_heads, 1, d, generator=g), torch.randn(B, kv_heads, 1, d, generator=g)
    seen = {}

    def step(s, li):
        return q_gen, k_gen, v_gen

    def before_cut(cache):  # the prompt's keys, to compute what the generated row attends to
        seen["keys"] = cache.layers[0].keys.clone()

    policy = SnapKV(budget=12, window=2, kernel=1, protect=(), lookahead=1, lookahead_share=1.0)
    cache = run_policy(policy, layout, layers=1, seed=3, decode=1, decode_qkv=step, on_prefill=before_cut)
    keys = torch.cat([seen["keys"], k_gen], dim=2)
    T = keys.shape[2]
    valid = torch.cat([layout.valid, torch.ones(B, 1, dtype=torch.bool)], dim=1)
    probs = kernels.attention_probs(q_gen, keys, d**-0.5, torch.full((B, 1), T - 1), valid)  # [B, H, 1, T]
    scores = kernels.group_reduce(probs.sum(2), kv_heads, "mean")
    n = layout.length
    for b in range(B):
        real = valid[b, :n].nonzero().flatten()
        window = real[-2:].tolist()
        pool = [p for p in real.tolist() if p not in window]
        for h in range(kv_heads):
            top = sorted(pool, key=lambda p: -float(scores[b, h, p]))[: 12 - 2]
            assert real_positions(cache, 0)[b][h] == sorted(top + window + [n])


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"budget": 0.1, "lookahead": -1}, "lookahead"),
        ({"budget": 0.1, "lookahead": 1, "lookahead_share": 1.5}, "lookahead_share"),
        ({"budget": 0.1, "lookahead": 1, "prune_at": 1}, "choose one"),
        ({"budget": 0.1, "lookahead": 1, "cascading": True}, "choose one"),
    ],
)
def test_bad_lookahead_settings_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        VLCache(**settings)


def test_a_policy_that_cannot_look_ahead_says_so():
    with pytest.raises(ValueError, match="snapkv, pyramidkv and vlcache"):
        H2O(budget=0.1, lookahead=1)


def _union_view(prompt_mean, gen_mean):
    """A one-row view of T plain slots (no markers, no question) holding the prompt rows' mean attention."""
    B, H, T = prompt_mean.shape
    layout = layout_from_ids(torch.full((B, T), 7))
    view = view_for(layout, heads=H, kv_heads=2)
    view.slot_state["lookahead"] = prompt_mean
    return view, gen_mean


def _kept(policy, view, gen, k):
    plan = Plan(torch.zeros_like(view.layout.valid), [(view.layout.valid, torch.tensor([k]))])
    sel = policy.lookahead_select(view, plan, gen, 1)
    real = torch.ones_like(sel.indices, dtype=torch.bool) if sel.filler is None else ~sel.filler
    return [sorted(sel.indices[0, h][real[0, h]].tolist()) for h in range(sel.indices.shape[1])]


def test_the_union_rule_keeps_each_sides_own_top_picks():
    # the prompt rows spread a large mass over slots 0-5, the generated row puts a small one on slots 10-12: the
    # mix ranks the prompt's slots first and keeps none of the generated row's; the union takes turns
    T = 16
    prompt = torch.zeros(1, 4, T)
    prompt[..., :6] = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    gen = torch.zeros(1, 4, T)
    gen[..., 10:13] = torch.tensor([0.3, 0.2, 0.1])
    view, gen = _union_view(prompt, gen)
    union = VLCache(budget=4, protect=(), recent=0.0, lookahead=1)
    mix = VLCache(budget=4, protect=(), recent=0.0, lookahead=1, lookahead_rule="mix")
    assert _kept(union, view, gen, 4) == [[0, 1, 10, 11]] * 2  # best of each side, in turn
    assert _kept(mix, view, gen, 4) == [[0, 1, 2, 3]] * 2
    share = VLCache(budget=4, protect=(), recent=0.0, lookahead=1, lookahead_share=0.75)
    assert _kept(share, view, gen, 4) == [[0, 10, 11, 12]] * 2  # three turns of the generated row to one


def test_the_union_rules_head_budgets_follow_the_strongest_query_head():
    # KV head 0's group: one query head sharp on slots 3 and 4, the other flat; KV head 1's: both peaked on 5-7.
    # The group mean halves the sharp head, so Ada-KV gives KV head 1 three of the layer's four slots and KV head 0
    # loses slot 4; the group max leaves KV head 0 both
    T = 12
    flat = torch.full((T,), 1.0 / T)
    sharp = torch.zeros(T)
    sharp[3:5] = 0.5
    peaked = torch.full((T,), 0.001)
    peaked[5:8] = 0.33
    prompt = torch.stack([sharp, flat, peaked, peaked])[None]
    view, gen = _union_view(prompt, prompt.clone())
    kw = dict(budget=2, protect=(), recent=0.0, lookahead=1, head_budgets="adaptive", head_floor=0.0)
    union = _kept(VLCache(**kw), view, gen, 2)
    mixed = _kept(VLCache(lookahead_rule="mix", **kw), view, gen, 2)
    assert union[0] == [3, 4] and len(union[1]) == 2
    assert mixed == [[3], [5, 6, 7]]


def test_a_bad_lookahead_rule_is_refused():
    with pytest.raises(ValueError, match="lookahead_rule"):
        VLCache(budget=0.1, lookahead=1, lookahead_rule="max")
