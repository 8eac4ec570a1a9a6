"""Policy settings that change what a policy computes, each checked against its definition on hand-made views:
Ada-KV's per-head floor, the GQA aggregation (`agg`), VL-Cache's fallback rows."""

import pytest
import torch
from util import IMG_ID, kept_indices, layout_from_ids, view_for

from vlcache import kernels
from vlcache.policies import H2O, SnapKV, VLCache


def _colsum(view, rows=slice(None)):
    """[B, H, T] by hand: the causal softmax attention of the query rows `rows` (a prefill view: row r is slot r),
    summed over those rows, per query head."""
    q, k = view.query, view.keys
    g = q.shape[1] // k.shape[1]
    logits = q @ k.repeat_interleave(g, dim=1).transpose(-1, -2) * view.scale
    T = k.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)[:, :, rows].sum(2)


def _per_head_kept(policy, view, scores):
    """[Hk] the real tokens each KV head of the first row keeps (filler slots, held for shape only, left out)."""
    sel = policy.select(view, policy.plan(view), scores)
    filler = torch.zeros_like(sel.indices, dtype=torch.bool) if sel.filler is None else sel.filler
    return (~filler).sum(-1)[0]


def test_adaptive_head_budgets_keep_each_heads_floor():
    """With head_budgets="adaptive", every KV head keeps at least floor(head_floor x k) of its tokens, even a head
    whose scores sit on two tokens; with head_floor=0 the joint top-k leaves that head its two tokens only, so the
    floor is what keeps the rest."""
    T, k = 30, 10
    concentrated = torch.full((T,), 0.001)
    concentrated[[3, 17]] = 0.45
    spread = torch.linspace(0.04, 0.01, T)  # every token above the concentrated head's tail
    scores = torch.stack([concentrated, spread])[None]  # [1, Hk=2, T]
    view = view_for(layout_from_ids([1] * T), heads=4, kv_heads=2)
    kept = {}
    for floor in (0.0, 0.5):
        policy = H2O(budget=k, recent=0.0, protect=(), head_budgets="adaptive", head_floor=floor)
        kept[floor] = _per_head_kept(policy, view, scores).tolist()
        assert sum(kept[floor]) == 2 * k  # the layer's budget, moved between heads
    assert kept[0.0] == [2, 18]  # no floor: the concentrated head falls below floor(0.5 x k)
    assert kept[0.5] == [5, 15] and min(kept[0.5]) >= int(0.5 * k)


AGG_POLICIES = {
    "h2o": (lambda agg: H2O(budget=0.5, agg=agg), slice(None)),  # every prompt row
    "vlcache": (lambda agg: VLCache(budget=0.5, agg=agg), slice(None)),  # no vision: every row is post-vision
    "snapkv": (lambda agg: SnapKV(budget=0.5, window=4, kernel=1, agg=agg), slice(-4, None)),  # the window rows
}


@pytest.mark.parametrize("name", list(AGG_POLICIES))
def test_agg_combines_a_kv_groups_query_heads_as_it_says(name):
    """`agg` is how the query heads of a GQA group combine into their KV head's score: "max" is the largest of the
    group's attention sums, "mean" their mean; on this view the two rank the tokens differently."""
    make, rows = AGG_POLICIES[name]
    view = view_for(layout_from_ids([1] * 16), heads=6, kv_heads=2, seed=4)
    per_head = _colsum(view, rows).view(1, 2, 3, 16)
    want = {"max": per_head.amax(2), "mean": per_head.mean(2)}
    scored = slice(None) if name != "snapkv" else slice(None, -4)  # SnapKV's window scores inf (always kept)
    assert not torch.equal(want["max"][..., scored].argsort(-1), want["mean"][..., scored].argsort(-1))
    for agg, expected in want.items():
        got = make(agg).score(view)
        torch.testing.assert_close(got[..., scored], expected[..., scored], atol=1e-6, rtol=1e-5)


def test_vlcache_scores_a_prompt_ending_on_vision_by_its_last_fallback_rows():
    """A prompt whose last token is a vision token has no post-vision rows: VL-Cache then scores by the attention
    of its last `fallback_rows` rows alone (not all rows), per query head, and its score is their group mean."""
    view = view_for(layout_from_ids([1, 2] + [IMG_ID] * 14), heads=4, kv_heads=2, seed=1)
    policy = VLCache(budget=0.5, fallback_rows=4)
    colsum, rows, _ = policy.measure(view)
    assert rows.tolist() == [4]
    torch.testing.assert_close(colsum, _colsum(view, slice(-4, None)), atol=1e-6, rtol=1e-5)
    assert not torch.allclose(colsum, _colsum(view), atol=1e-3)  # all rows would give other scores
    torch.testing.assert_close(policy.score(view), kernels.group_reduce(colsum, 2, "mean"))


@pytest.mark.parametrize(
    "name, settings",
    [("snapkv", {"window": 32}), ("pyramidkv", {"window": 32}), ("streamingllm", {"sinks": 8})],
)
def test_a_methods_window_and_sinks_stay_within_the_vision_budget(name, settings):
    """SnapKV's 32-row window reached 16 tokens into a video after a short question and kept them all, 16 of 128
    vision tokens at vision_budget=0.01; a prompt opening on an image gave StreamingLLM's sinks the same way out.
    A modality's amount bounds what the method itself keeps there; its text is kept whole."""
    from vlcache.policies import make_policy
    from vlcache.policies.budget import resolve

    ids = [[IMG_ID] * 8 + [1, 2] + [IMG_ID] * 120 + list(range(20, 36))]  # 128 vision tokens, 18 text
    layout = layout_from_ids(ids)
    view = view_for(layout)
    policy = make_policy(name, vision_budget=0.01, protect=(), **settings)
    kept = kept_indices(policy, view)[0, 0]
    vision = layout.vision[0]
    want = int(resolve(0.01, vision.sum()[None])[0])
    assert int(vision[kept].sum()) == want and int((~vision[kept]).sum()) == 18


def test_a_setting_of_the_wrong_kind_is_named_from_python_too():
    """compress(model, "snapkv", budget=0.1, window="x") ended in a TypeError from `window < 1`."""
    from vlcache.policies import make_policy

    with pytest.raises(ValueError, match=r"^snapkv: window='x': window takes a whole number \(default 32\)$"):
        make_policy("snapkv", budget=0.1, window="x")
    with pytest.raises(ValueError, match="evict_every takes a whole number"):
        make_policy("h2o", budget=0.1, evict_every=2.5)
    assert make_policy("h2o", budget=0.1, recent=1).recent == 1  # a whole number where a number is asked is one
