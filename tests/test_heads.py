"""Ada-KV per-head budgets (`head_budgets="adaptive"`): the defining properties on hand-made scores, and in a policy."""

import pytest
import torch
from util import layout_from_ids, view_for

from vlcache.policies import SnapKV, VLCache
from vlcache.policies.heads import adaptive_head_budgets


def test_budgets_sum_to_the_layer_budget_and_respect_the_floor():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 4, 50, generator=g) ** 4
    pool = torch.rand(3, 4, 50, generator=g) > 0.2
    pool[:] = pool[:, :1]  # the same candidates in every head
    k = torch.tensor([5, 9, 12])
    got = adaptive_head_budgets(scores, pool, k, floor=0.5)
    assert got.sum(-1).tolist() == (4 * k).tolist()
    assert bool((got >= torch.floor(k * 0.5)[:, None]).all())
    assert bool((got <= pool.sum(-1)).all())


def test_a_head_that_spreads_its_attention_gets_more_than_one_that_concentrates_it():
    T = 40
    concentrated = torch.full((T,), 0.001)
    concentrated[[3, 17]] = 0.45  # two tokens hold nearly all of its attention
    spread = torch.linspace(0.04, 0.01, T)  # many tokens matter a little
    scores = torch.stack([concentrated, spread])[None]  # [1, 2, T]
    pool = torch.ones(1, 2, T, dtype=torch.bool)
    got = adaptive_head_budgets(scores, pool, torch.tensor([10]), floor=0.2)[0].tolist()
    assert got[0] < 10 < got[1] and sum(got) == 20


def test_without_a_floor_the_heads_keep_the_layers_joint_top_scores():
    # Ada-KV's rule: the layer's Hk * k best scores over all heads together, each head keeping its share of them;
    # that kept mass is the most any split of Hk * k can keep, above the even split whenever the heads differ
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        scores = torch.softmax(torch.randn(2, 4, 60, generator=g) * 3, -1)
        pool = torch.ones_like(scores, dtype=torch.bool)
        k = torch.tensor([8, 8])
        per_head = adaptive_head_budgets(scores, pool, k, floor=0.0)
        top = scores.sort(-1, descending=True).values
        for b in range(2):
            adaptive = sum(top[b, h, : per_head[b, h]].sum() for h in range(4))
            joint = scores[b].flatten().topk(4 * 8).values.sum()
            even = top[b, :, :8].sum()
            torch.testing.assert_close(adaptive, joint)
            assert adaptive > even


def test_floor_one_is_the_even_split():
    scores = torch.rand(2, 4, 30)
    pool = torch.ones_like(scores, dtype=torch.bool)
    assert adaptive_head_budgets(scores, pool, torch.tensor([7, 3]), floor=1.0).tolist() == [[7] * 4, [3] * 4]


@pytest.mark.parametrize("policy_cls, extra", [(SnapKV, {"window": 4}), (VLCache, {})])
def test_a_policy_with_adaptive_heads_keeps_its_budget_in_real_tokens(policy_cls, extra):
    layout = layout_from_ids([1, 2] + [9] * 40 + [3, 4, 5])
    view = view_for(layout, kv_heads=4, heads=8, seed=3)
    policies = [policy_cls(budget=0.3, protect=(), head_budgets=h, **extra) for h in ("uniform", "adaptive")]
    sels = []
    for pol in policies:
        pol.on_prefill(view)  # VL-Cache only scores here (it selects once every layer is seen)
        scores = view.slot_state["vlcache"] if policy_cls is VLCache else pol.score(view)
        sels.append(pol.select(view, pol.plan(view), scores))
    uniform, adaptive = sels
    assert uniform.filler is None and adaptive.filler is not None  # the heads keep different counts
    kept = (~adaptive.filler).sum(-1)[0]  # real tokens per head
    assert int(kept.sum()) == 4 * uniform.indices.shape[-1] == 4 * int(0.3 * 45)
    assert len(set(kept.tolist())) > 1
    assert adaptive.indices.shape[-1] == int(kept.max())  # stored: the largest head's count


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="head_budgets"):
        SnapKV(budget=0.1, head_budgets="ada")
    with pytest.raises(ValueError, match="head_floor"):
        SnapKV(budget=0.1, head_budgets="adaptive", head_floor=1.5)
