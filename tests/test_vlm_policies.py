"""VL-Cache, LOOK-M, Elastic Cache and CAKE: each method's defining behaviour on hand-made tensors, the tiled
scoring they rely on, and the methods end to end inside generate."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from util import IMG_ID, MARK_ID, kept_positions, layout_from_ids, prompt_for, run_policy, view_for

import vlcache
from vlcache import testing
from vlcache.kernels import reference as ref
from vlcache.policies import CAKE, H2O, LOOKM, POLICIES, ElasticCache, Request, VLCache, make_policy
from vlcache.policies.cake import cake_allocate

IDS = [1, 5, 6, MARK_ID] + [IMG_ID] * 20 + [MARK_ID, 7, MARK_ID] + [IMG_ID] * 20 + [MARK_ID] + list(range(10, 23))
N = len(IDS)  # 61: 21 text (markers included), 40 image, the question is the last 14 rows


def _softmax_rows(q, k, rows, scale, valid=None):
    """Independent reference: probabilities of query rows `rows` over causal keys, [B, H, R, T]."""
    g = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(g, dim=1)
    logits = q[:, :, rows] @ kk.transpose(-1, -2) * scale
    T = k.shape[2]
    causal = torch.arange(T)[None, :] <= torch.as_tensor(rows)[:, None]
    if valid is not None:
        causal = causal & valid[:, None, None, :]
    return logits.masked_fill(~causal, float("-inf")).softmax(-1).nan_to_num(0.0)


# ----------------------------------------------------------------------------- tiled scoring


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_tiled_stats_equal_full_matrix(chunk):
    g = torch.Generator().manual_seed(0)
    B, H, Hk, T, d = 2, 6, 2, 37, 16
    q, k = torch.randn(B, H, T, d, generator=g), torch.randn(B, Hk, T, d, generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False  # left padding in row 1
    rows = list(range(T))
    p = _softmax_rows(q, k, rows, 0.25, valid) * valid[:, None, :, None]
    st = ref.attention_stats(
        q, k, 0.25, torch.arange(T).expand(B, T), valid, valid, with_sq=True, density_fraction=0.01, chunk=chunk
    )
    torch.testing.assert_close(st.colsum, p.sum(2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.colsq, (p * p).sum(2), atol=1e-5, rtol=1e-5)
    var = torch.stack([p[b, :, valid[b]].var(dim=1) for b in range(B)])  # over real rows only
    torch.testing.assert_close(st.variance(), var, atol=1e-5, rtol=1e-4)
    dens = ((p >= 0.01 * p.amax(-1, keepdim=True)) & (p > 0)).sum(-1).float()
    torch.testing.assert_close(st.density, dens)


def test_window_rows_equal_full_matrix():
    g = torch.Generator().manual_seed(1)
    B, H, Hk, T, d = 1, 4, 1, 29, 8
    q, k = torch.randn(B, H, T, d, generator=g), torch.randn(B, Hk, T, d, generator=g)
    rows = list(range(T - 7, T))
    got = ref.attention_probs(q[:, :, rows], k, 0.3, torch.tensor([rows]))
    torch.testing.assert_close(got, _softmax_rows(q, k, rows, 0.3), atol=1e-6, rtol=1e-6)


class _LargestAllocation(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["h2o", "lookm", "elastic", "vlcache"])
def test_scoring_an_8k_prompt_never_builds_an_n_by_n_matrix(name):
    n, H, Hk, d = 8192, 4, 2, 16
    layout = layout_from_ids([1] + [IMG_ID] * (n - 20) + list(range(10, 29)))
    g = torch.Generator().manual_seed(0)
    view = view_for(
        layout,
        torch.randn(1, H, n, d, generator=g),
        torch.randn(1, Hk, n, d, generator=g),
        torch.randn(1, Hk, n, d, generator=g),
    )
    view.request = Request([0], view.shared, lambda layer: view)
    policy = make_policy(name, budget=0.1)
    with _LargestAllocation() as probe:
        policy.on_prefill(view)
    assert probe.largest < H * n * n // 16  # an [H, n, n] matrix would be 16x this
    assert probe.largest <= 2 * H * 256 * n  # one row tile of 256 (fp32 probabilities and their mask)


# ----------------------------------------------------------------------------- VL-Cache


def test_vlcache_scores_come_from_post_vision_rows_and_density_matches():
    layout = layout_from_ids(IDS)
    view = view_for(layout, seed=2)
    view.request = Request([0], view.shared, lambda layer: view)
    VLCache(budget=0.2).on_prefill(view)
    rows = list(range(layout.samples[0].question_start, N))
    p = _softmax_rows(view.query, view.keys, rows, view.scale)  # [1, 4, 14, 60]
    torch.testing.assert_close(view.slot_state["vlcache"], p.sum(2).view(1, 2, 2, N).mean(2), atol=1e-5, rtol=1e-5)
    causal = torch.tensor([r + 1 for r in rows], dtype=torch.float32)
    nonzero = (p >= 0.01 * p.amax(-1, keepdim=True)).sum(-1).float()  # [1, 4, 14]
    sparsity = (causal - nonzero).sum(-1) / causal.sum()
    assert view.shared["vlcache_density"].by_layer[0] == pytest.approx([1 - float(sparsity.mean())], abs=1e-6)


def _dense_and_sparse_layers(n=N, d=8):
    """Layer 0 attends uniformly (dense); in layer 1 every query looks at key 10 (sparse)."""
    g = torch.Generator().manual_seed(3)
    k0, v0, v1 = (torch.randn(1, 2, n, d, generator=g) for _ in range(3))
    q0 = torch.zeros(1, 4, n, d)
    k1 = torch.zeros(1, 2, n, d)
    k1[..., 10, 0] = 8.0
    q1 = torch.zeros(1, 4, n, d)
    q1[..., 0] = 8.0
    return [(q0, k0, v0), (q1, k1, v1)]


def test_vlcache_denser_layer_gets_more_and_budgets_sum_to_total():
    layout = layout_from_ids(IDS)
    cache = run_policy(VLCache(budget=0.25, protect=()), layout, layers=2, qkv=_dense_and_sparse_layers())
    (d0,), (d1,) = cache.shared["vlcache_density"].by_layer[0], cache.shared["vlcache_density"].by_layer[1]
    assert d0 > d1
    s0, s1 = cache.layers[0].physical_length, cache.layers[1].physical_length
    assert s0 > s1 and s0 + s1 == 2 * 15
    assert s1 >= 1  # the clip keeps at least 1% of the prompt


def test_vlcache_paper_rounding_option():
    layout = layout_from_ids(IDS)
    density = [0.9, 0.1]
    exact = VLCache(budget=0.25).layer_budgets(density, 15, N)
    paper = VLCache(budget=0.25, exact=False).layer_budgets(density, 15, N)
    assert sum(exact) == 30 and paper == [27, 3]
    # in a run, each layer holds what the paper's rounding gives it for the densities the run measured
    cache = run_policy(VLCache(budget=0.25, exact=False, protect=()), layout, layers=2, qkv=_dense_and_sparse_layers())
    measured = [cache.shared["vlcache_density"].by_layer[i][0] for i in range(2)]
    want = VLCache(budget=0.25, exact=False).layer_budgets(measured, 15, N)
    assert [cache.layers[i].physical_length for i in range(2)] == want


# ----------------------------------------------------------------------------- LOOK-M


@pytest.mark.parametrize("budget,all_text", [(10, False), (30, True)])
def test_lookm_keeps_text_before_images(budget, all_text):
    layout = layout_from_ids(IDS)
    cache = run_policy(LOOKM(budget=budget, recent=0.0, protect=(), merge="none"), layout, layers=1)
    text = set(layout.text[0].nonzero().flatten().tolist())
    for h in range(2):
        kept = set(kept_positions(cache)[0, h].tolist())
        assert (text <= kept) if all_text else (kept <= text)


def test_lookm_official_compat_keeps_all_text_beyond_budget():
    layout = layout_from_ids(IDS)
    cache = run_policy(LOOKM(budget=10, recent=0.0, protect=(), official_compat=True), layout, layers=1)
    text = set(layout.text[0].nonzero().flatten().tolist())
    assert cache.layers[0].physical_length == len(text) > 10


def _expected_merge(k, v, kept, mode):
    """Loop-by-loop LOOK-M merge of one head: k, v [T, d]; kept list of slots."""
    kn = k / k.norm(dim=-1, keepdim=True)
    evicted = [t for t in range(len(k)) if t not in kept]
    acc_k = {c: [k[c].clone()] for c in kept}
    acc_v = {c: [v[c].clone()] for c in kept}
    for e in evicted:
        sims = torch.stack([kn[e] @ kn[c] for c in kept])
        c = kept[int(sims.argmax())]
        s = float(sims.max())
        if mode == "average":
            acc_k[c].append(k[e])
            acc_v[c].append(v[e])
        elif mode == "pivot":
            acc_k[c].append((k[e] + k[c]) / 2)
            acc_v[c].append((v[e] + v[c]) / 2)
        else:
            acc_k[c].append(s * k[e])
            acc_v[c].append(s * v[e])
    keys = torch.stack([torch.stack(acc_k[c]).mean(0) for c in kept])
    values = torch.stack([torch.stack(acc_v[c]).mean(0) for c in kept])
    return keys, values


@pytest.mark.parametrize("mode", ["average", "pivot", "weighted"])
def test_lookm_merged_entries_follow_the_formula(mode):
    ids = [1, 5] + [IMG_ID] * 14 + [6, 7, 8, 9]
    layout = layout_from_ids(ids)
    g = torch.Generator().manual_seed(4)
    n, d = len(ids), 8
    q, k, v = (
        torch.randn(1, 4, n, d, generator=g),
        torch.randn(1, 2, n, d, generator=g),
        torch.randn(1, 2, n, d, generator=g),
    )
    cache = run_policy(LOOKM(budget=9, merge=mode), layout, layers=1, qkv=[(q, k, v)])
    for h in range(2):
        kept = kept_positions(cache)[0, h].tolist()
        want_k, want_v = _expected_merge(k[0, h], v[0, h], kept, mode)
        torch.testing.assert_close(cache.layers[0].keys[0, h], want_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.layers[0].values[0, h], want_v, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- Elastic Cache


def test_elastic_merges_each_evicted_token_into_its_nearest_anchor():
    layout = layout_from_ids(IDS)
    g = torch.Generator().manual_seed(5)
    q, k, v = (
        torch.randn(1, 4, N, 8, generator=g),
        torch.randn(1, 2, N, 8, generator=g),
        torch.randn(1, 2, N, 8, generator=g),
    )
    policy = ElasticCache(budget=0.5, protect=())
    cache = run_policy(policy, layout, layers=1, qkv=[(q, k, v)])
    kept = kept_positions(cache)[0, 0].tolist()
    assert kept_positions(cache)[0, 1].tolist() == kept  # one choice for every head
    forced = {0, N - 1}  # start_size 1 and the last prompt token
    anchors = [p for p in kept if p not in forced]
    members = {a: [a] for a in anchors}
    for e in range(N):
        if e not in kept:
            best = min(anchors, key=lambda a: (abs(a - e), a))  # nearest, ties to the earlier anchor
            members[best].append(e)
    for col, p in enumerate(kept):
        want = k[0, :, members[p]].mean(1) if p in members else k[0, :, p]
        torch.testing.assert_close(cache.layers[0].keys[0, :, col], want, atol=1e-5, rtol=1e-5)
        want_v = v[0, :, members[p]].mean(1) if p in members else v[0, :, p]
        torch.testing.assert_close(cache.layers[0].values[0, :, col], want_v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 7, 30])
def test_elastic_holds_the_kept_fraction_while_decoding(steps):
    layout = layout_from_ids(IDS)
    policy = ElasticCache(budget=0.5, protect=())
    after_prefill = run_policy(policy, layout, layers=2)
    cache = run_policy(policy, layout, layers=2, decode=steps)
    for i in range(2):
        assert cache.layers[i].physical_length == math.floor(0.5 * (N + steps))
        # everything before the fixed point stays where it was
        point = cache.layers[i].state["policy"].point
        assert torch.equal(kept_positions(cache, i)[..., :point], kept_positions(after_prefill, i)[..., :point])


# ----------------------------------------------------------------------------- CAKE


def test_cake_allocate():
    assert cake_allocate(100, [1, 1, 2], cap=1000) == [25, 25, 50]
    capped = cake_allocate(100, [10, 1, 1], cap=40)
    assert sum(capped) == 100 and max(capped) == 40
    assert sum(cake_allocate(97, [0.3, 0.2, 0.5, 0.1], cap=60)) == 97


def test_cake_cascading_stays_within_the_total_during_prefill():
    layout = layout_from_ids(IDS)
    S, w, L = 20, 4, 4
    total = L * (S - w)
    seen = []

    def check(cache, li):  # after layer li's prefill and cut
        seen.append(sum(cache.layers[j].physical_length for j in range(li + 1)))

    cache = run_policy(CAKE(budget=S, window=w, protect=()), layout, layers=L, on_layer=check)
    for m, held in enumerate(seen):
        assert held <= total + (m + 1) * w
    assert sum(cache.layers[i].physical_length - w for i in range(L)) == total


def test_cake_without_cascading_holds_everything_until_the_end():
    layout = layout_from_ids(IDS)
    seen = []
    cache = run_policy(
        CAKE(budget=20, window=4, protect=(), cascading=False),
        layout,
        layers=3,
        on_layer=lambda c, li: seen.append(c.layers[li].physical_length),
    )
    assert seen == [N, N, N]
    assert sum(cache.layers[i].physical_length for i in range(3)) == 3 * 20


def test_cake_prefers_the_layer_with_spread_and_shifting_attention():
    layout = layout_from_ids(IDS)
    cache = run_policy(CAKE(budget=20, window=4, protect=()), layout, layers=2, qkv=_dense_and_sparse_layers())
    assert cache.layers[0].physical_length > cache.layers[1].physical_length


def test_cake_decode_keeps_each_layer_at_its_size():
    layout = layout_from_ids(IDS)
    prefill = run_policy(CAKE(budget=20, window=4, protect=()), layout, layers=3)
    cache = run_policy(CAKE(budget=20, window=4, protect=()), layout, layers=3, decode=12)
    for i in range(3):
        assert cache.layers[i].physical_length == prefill.layers[i].physical_length
        assert (kept_positions(cache, i)[..., -4:] == torch.arange(N + 8, N + 12)).all()  # the newest window stays


def test_cake_leaves_a_prompt_that_fits():
    layout = layout_from_ids(IDS)
    cache = run_policy(CAKE(budget=N - 4, window=4), layout, layers=2, decode=3)
    assert [cache.layers[i].physical_length for i in range(2)] == [N + 3, N + 3]


# ----------------------------------------------------------------------------- end to end


NEW = [VLCache(budget=0.3), LOOKM(budget=0.3), ElasticCache(budget=0.5), CAKE(budget=24, window=8)]
E2E_FAMILIES = ["llava", "llava_onevision", "qwen2_vl"]


@pytest.mark.parametrize("family", E2E_FAMILIES)
@pytest.mark.parametrize("name", [n for n, c in POLICIES.items() if c.needs_budget])
def test_every_policy_runs_in_generate(tiny_model, family, name):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    n = inputs["input_ids"].shape[1]
    policy = make_policy(name, budget=24) if name == "cake" else make_policy(name, budget=0.3)
    with vlcache.compress(model, policy) as session:
        out = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert out.shape == (1, n + 20)
    assert session.prefill_stats.kv_ratio < 0.7


@pytest.mark.parametrize(
    "policy",
    [VLCache(budget=1.0), LOOKM(budget=1.0), ElasticCache(budget=1.0), CAKE(budget=1.0), H2O(budget=1.0)],
    ids=lambda p: p.name,
)
def test_keep_all_is_token_identical_for_every_method(tiny_model, policy):
    model = tiny_model("qwen2_vl")
    inputs = testing.make_inputs(model, prompt_for("qwen2_vl")).inputs
    plain = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    with vlcache.compress(model, policy):
        assert torch.equal(model.generate(**inputs, max_new_tokens=12, do_sample=False), plain)


def _generate(model, policy, inputs):
    with vlcache.compress(model, policy):
        return model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, do_sample=False)


@pytest.mark.parametrize("policy", NEW, ids=lambda p: p.name)
def test_batch_equals_each_prompt_alone(tiny_model, policy):
    model = tiny_model("llava")
    rows = [["ab", testing.IMAGE, "what is it?"], ["xyzw vv", testing.IMAGE, "tell me more about it"]]
    batch = _generate(model, policy, testing.make_inputs(model, rows).inputs)
    for b, row in enumerate(rows):
        alone = _generate(model, policy, testing.make_inputs(model, [row], seed=b).inputs)
        assert batch[b, -10:].tolist() == alone[0, -10:].tolist()
