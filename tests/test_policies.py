"""Policies on hand-made tensors: the shared invariants for every policy, then each method's defining property."""

import math

import pytest
import torch
from util import IMG_ID, MARK_ID, kept_indices, kept_positions, layout_from_ids, run_policy, view_for

from vlcache.kernels import reference as ref
from vlcache.policies import H2O, POLICIES, Full, PyramidKV, Random, SnapKV, StreamingLLM, make_policy
from vlcache.policies.budget import apportion, check_amount, resolve, select_indices
from vlcache.policies.pyramidkv import pyramid

# text, markers around two images, a question: 60 tokens
IDS = (
    [1, 5, 6, MARK_ID]
    + [IMG_ID] * 20
    + [MARK_ID, 7, MARK_ID]
    + [IMG_ID] * 20
    + [MARK_ID]
    + [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22]
)

BUDGETED = [name for name, cls in POLICIES.items() if cls.needs_budget]
LAYER_ADAPTIVE = {"pyramidkv", "vlcache", "cake"}  # per-layer budgets differ, their sum is fixed
L = 3


def _policy(name, **kw):
    extra = {"window": 4} if name in ("snapkv", "pyramidkv", "cake") else {}
    return make_policy(name, **extra, **kw)


def _sizes(cache):
    return [cache.layers[i].physical_length for i in range(L)]


# ----------------------------------------------------------------------------- the shared matrix: every policy


@pytest.mark.parametrize("name", list(POLICIES))
def test_keep_all_is_identity(name):
    layout = layout_from_ids(IDS)
    policy = Full() if name == "full" else _policy(name, budget=1.0)
    cache = run_policy(policy, layout, layers=L)
    n = len(IDS)
    g = torch.Generator().manual_seed(0)
    for i in range(L):
        assert torch.equal(kept_positions(cache, i), torch.arange(n).expand(1, 2, n))
        torch.randn(1, 4, n, 8, generator=g)  # the q run_policy drew
        assert torch.equal(cache.layers[i].keys, torch.randn(1, 2, n, 8, generator=g))  # untouched, not merged
        torch.randn(1, 2, n, 8, generator=g)


@pytest.mark.parametrize("name", BUDGETED)
@pytest.mark.parametrize("budget", [0.25, 0.5, 17])
def test_kept_count_equals_budget(name, budget):
    layout = layout_from_ids(IDS)
    n = len(IDS)
    want = min(budget, n) if isinstance(budget, int) else max(1, math.floor(budget * n))
    sizes = _sizes(run_policy(_policy(name, budget=budget, protect=()), layout, layers=L))
    if name in LAYER_ADAPTIVE:
        assert sum(sizes) == L * want
    else:
        assert sizes == [want] * L
    for i in range(L):
        pos = kept_positions(run_policy(_policy(name, budget=budget, protect=()), layout, layers=L), i)
        assert (pos.diff(dim=-1) > 0).all()  # ascending, no duplicates


@pytest.mark.parametrize("name", BUDGETED)
def test_protected_tokens_survive(name):
    layout = layout_from_ids(IDS)
    cache = run_policy(_policy(name, budget=0.1), layout, layers=L, decode=3)  # 6 tokens: fewer than protected
    protected = set((layout.marker | layout.question)[0].nonzero().flatten().tolist())
    for i in range(L):
        for h in range(2):
            assert protected <= set(kept_positions(cache, i)[0, h].tolist())


@pytest.mark.parametrize("name", BUDGETED)
def test_vision_budget_keeps_all_text(name):
    layout = layout_from_ids(IDS)
    cache = run_policy(_policy(name, vision_budget=0.25), layout, layers=L)
    text = set(layout.text[0].nonzero().flatten().tolist())
    vision = []
    for i in range(L):
        kept = kept_positions(cache, i)[0]
        for h in range(2):
            assert text <= set(kept[h].tolist())
        vision.append(len(kept[0]) - len(text))
    want = math.floor(0.25 * int(layout.vision.sum()))
    assert sum(vision) == L * want if name in LAYER_ADAPTIVE else vision == [want] * L


@pytest.mark.parametrize("name", BUDGETED)
def test_frame_minimum_keeps_every_span(name):
    layout = layout_from_ids(IDS)
    cache = run_policy(_policy(name, vision_budget=2, frame_min=3), layout, layers=L)
    for i in range(L):
        for h in range(2):
            kept = set(kept_positions(cache, i)[0, h].tolist())
            for span in layout.samples[0].spans:
                assert len(kept & set(range(span.start, span.end))) >= 3


# ----------------------------------------------------------------------------- defining properties


def test_streamingllm_keeps_sinks_and_recent():
    layout = layout_from_ids(IDS)
    n = len(IDS)
    idx = kept_indices(StreamingLLM(budget=20, sinks=4, protect=()), view_for(layout))
    expect = list(range(4)) + list(range(n - 16, n))
    assert idx[0, 0].tolist() == expect and idx[0, 1].tolist() == expect


@pytest.mark.parametrize("name", ["streamingllm", "elastic"])
def test_evicting_every_4_tokens_lands_where_every_token_does(name):
    """Eviction by position (StreamingLLM's oldest non-sinks, Elastic Cache's first deletable slots from its fixed
    point): dropping 4 every 4th token leaves, at those steps, exactly what dropping one every token leaves."""
    layout = layout_from_ids(IDS)
    n = len(IDS)
    for steps in (4, 8):
        kept = [
            kept_positions(run_policy(make_policy(name, budget=20, protect=(), evict_every=e), layout, decode=steps))
            .sort(-1)
            .values
            for e in (1, 4)
        ]
        assert torch.equal(kept[0], kept[1])
        assert kept[1].shape[-1] == 20
        if name == "streamingllm":
            assert kept[1][0, 0].tolist() == list(range(4)) + list(range(n + steps - 16, n + steps))
        else:  # a queue behind the fixed point: the first slot stays, the newest tokens all arrive
            assert kept[1][0, 0, 0] == 0 and kept[1][0, 0, -steps:].tolist() == list(range(n, n + steps))


def test_snapkv_keeps_top_window_scored_tokens():
    layout = layout_from_ids(IDS)
    view = view_for(layout, heads=4, kv_heads=2, d=16, seed=3)
    w, C = 6, 20
    idx = kept_indices(SnapKV(budget=C, window=w, kernel=1, protect=()), view)
    # independent scoring: softmax of the window rows over all keys, summed over rows, mean over each GQA group
    n = len(IDS)
    k = view.keys.repeat_interleave(2, dim=1)
    logits = view.query[:, :, n - w :] @ k.transpose(-1, -2) * view.scale
    causal = torch.arange(n)[None, :] <= torch.arange(n - w, n)[:, None]
    p = logits.masked_fill(~causal, float("-inf")).softmax(-1).sum(2)  # [1, 4, n]
    score = p.view(1, 2, 2, n).mean(2)[..., : n - w]
    for h in range(2):
        top = set(score[0, h].topk(C - w).indices.tolist())
        assert set(idx[0, h].tolist()) == top | set(range(n - w, n))


def test_snapkv_pooling_keeps_neighbours():
    # one key gets all the window's attention; with pooling its neighbours rank above every other token
    ids = [1] + [IMG_ID] * 30 + [5, 6, 7, 8]
    layout = layout_from_ids(ids)
    n, d = len(ids), 4
    q = torch.zeros(1, 1, n, d)
    k = torch.zeros(1, 1, n, d)
    q[..., 0] = 10.0
    k[0, 0, 15, 0] = 3.0
    view = view_for(layout, q=q, k=k, v=torch.zeros(1, 1, n, d))
    idx = kept_indices(SnapKV(budget=4 + 5, window=4, kernel=5, protect=()), view)
    assert set(range(13, 18)) <= set(idx[0, 0].tolist())


def test_h2o_keeps_heavy_hitters_and_recent():
    layout = layout_from_ids(IDS)
    view = view_for(layout, seed=5)
    C, n = 20, len(IDS)
    idx = kept_indices(H2O(budget=C, recent=0.5, protect=()), view)
    stats = ref.attention_stats(view.query, view.keys, view.scale, torch.arange(n)[None])
    score = ref.group_reduce(stats.colsum, 2)[..., : n - 10]
    for h in range(2):
        assert set(idx[0, h].tolist()) == set(score[0, h].topk(C - 10).indices.tolist()) | set(range(n - 10, n))


def test_h2o_normalize_ranks_by_mean_attention_of_the_rows_that_see_a_key():
    """normalize=True: a key's score is its attention column sum over the prompt rows divided by the n - j rows at
    or after it (kvpress's ObservedAttentionPress form); the default keeps the plain sums."""
    layout = layout_from_ids(IDS)
    view = view_for(layout, seed=5)
    C, n = 20, len(IDS)
    stats = ref.attention_stats(view.query, view.keys, view.scale, torch.arange(n)[None])
    colsum = ref.group_reduce(stats.colsum, 2)
    mean = colsum / torch.arange(n, 0, -1, dtype=torch.float32)
    torch.testing.assert_close(H2O(budget=C, normalize=True).score(view), mean)
    torch.testing.assert_close(H2O(budget=C).score(view), colsum)
    idx = kept_indices(H2O(budget=C, recent=0.0, normalize=True, protect=()), view)
    for h in range(2):
        assert set(idx[0, h].tolist()) == set(mean[0, h].topk(C).indices.tolist())
        assert set(idx[0, h].tolist()) != set(colsum[0, h].topk(C).indices.tolist())  # the option changes the choice


def test_h2o_normalize_counts_rows_while_decoding():
    """The row counts follow the slots through evictions: after n prompt rows and d decode steps the slot at
    position p has been seen by n + d - p rows."""
    layout = layout_from_ids(IDS)
    n, d = len(IDS), 5
    cache = run_policy(H2O(budget=20, normalize=True, protect=()), layout, layers=2, decode=d)
    for i in range(2):
        pos = kept_positions(cache, i)
        assert pos.shape[-1] == 20 and (pos >= n).any()  # at budget, generated tokens among the kept
        torch.testing.assert_close(cache.layers[i].slot_state["h2o_rows"], (n + d - pos).float())


def test_h2o_normalize_must_be_a_bool():
    with pytest.raises(ValueError, match="normalize"):
        H2O(budget=0.2, normalize=1)


def test_pyramidkv_budgets_decrease_and_sum_to_total():
    layout = layout_from_ids(IDS)
    L, C = 6, 24
    policy = PyramidKV(budget=C, window=4, protect=())
    sizes = [kept_indices(policy, view_for(layout, layer=i, num_layers=L)).shape[-1] for i in range(L)]
    assert all(a >= b for a, b in zip(sizes, sizes[1:])) and sizes[0] > sizes[-1]
    assert sum(sizes) == L * C


def test_pyramid_formula():
    assert pyramid(100, 500, 8, 20) == [195, 168, 141, 114, 86, 59, 32, 5]  # min 5, max 195, linear
    capped = pyramid(100, 150, 8, 20)  # max would pass the pool: max = 150, min = 50
    assert capped[0] == 150 and capped[-1] == 50 and sum(capped) == 800


def test_random_is_seeded_and_shared_option():
    layout = layout_from_ids(IDS)
    a = kept_indices(Random(budget=0.3, seed=1), view_for(layout))
    b = kept_indices(Random(budget=0.3, seed=1), view_for(layout))
    assert torch.equal(a, b)
    s0 = kept_indices(Random(budget=0.3, seed=2, shared=True), view_for(layout, layer=0))
    s1 = kept_indices(Random(budget=0.3, seed=2, shared=True), view_for(layout, layer=1))
    assert torch.equal(s0, s1) and torch.equal(s0[0, 0], s0[0, 1])
    # and what the seed and shared=False are for: another seed, another layer, another KV head choose otherwise
    other = kept_indices(Random(budget=0.3, seed=2), view_for(layout))
    assert not torch.equal(a, other)
    u0 = kept_indices(Random(budget=0.3, seed=2), view_for(layout, layer=0))
    u1 = kept_indices(Random(budget=0.3, seed=2), view_for(layout, layer=1))
    assert not torch.equal(u0, u1) and not torch.equal(u0[0, 0], u0[0, 1])


# ----------------------------------------------------------------------------- selection and budgets


def test_select_fills_shorter_rows_with_padding():
    # row 0: 6 real tokens keeps 3; row 1: 4 real (2 pads) keeps 2, then pads fill up to 3 slots
    valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
    scores = torch.tensor([[[0.0, 5, 1, 4, 2, 3]], [[9.0, 9, 1, 4, 2, 3]]])
    pool_k = torch.tensor([3, 2])
    idx = select_indices(scores, torch.zeros_like(valid), [(valid, pool_k)], valid[:, None, :])
    assert idx[0, 0].tolist() == [1, 3, 5]
    assert idx[1, 0].tolist() == [0, 3, 5] or idx[1, 0].tolist() == [1, 3, 5]
    assert valid[1, idx[1, 0]].sum() == 2


def test_ties_go_to_the_lower_position():
    valid = torch.ones(1, 5, dtype=torch.bool)
    idx = select_indices(torch.ones(1, 1, 5), torch.zeros_like(valid), [(valid, torch.tensor([2]))], valid[:, None])
    assert idx[0, 0].tolist() == [0, 1]


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, -0.1, float("nan"), True, "10%"])
def test_bad_amounts_raise_with_range(bad):
    with pytest.raises(ValueError, match="range|ratio"):
        check_amount("budget", bad)


def test_resolve_and_apportion():
    n = torch.tensor([100, 7, 0])
    assert resolve(0.1, n).tolist() == [10, 1, 0]
    assert resolve(50, n).tolist() == [50, 7, 0]
    assert apportion(10, [1, 1, 1]) == [4, 3, 3]
    assert apportion(10, [5, 1, 1], caps=[2, 10, 10]) == [2, 4, 4]
    assert sum(apportion(1000, [0.3, 0.2, 0.5], caps=[100, 1000, 1000])) == 1000


def test_settings_validation():
    with pytest.raises(ValueError, match="budget"):
        SnapKV()
    with pytest.raises(ValueError, match="either budget"):
        SnapKV(budget=0.1, vision_budget=0.1)
    with pytest.raises(ValueError, match="protect"):
        SnapKV(budget=0.1, protect=("images",))
    with pytest.raises(ValueError, match="kernel"):
        SnapKV(budget=0.1, kernel=4)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope", budget=0.1)
