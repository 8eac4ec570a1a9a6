"""Triton kernels against their PyTorch references, on awkward shapes, under TRITON_INTERPRET=1 on the CPU (set in
conftest.py before any kernel module is imported) and natively on a GPU."""

import pytest
import torch

triton = pytest.importorskip("triton")

from vlcache import kernels  # noqa: E402
from vlcache.kernels import reference as ref  # noqa: E402
from vlcache.kernels.triton_decode_mass import decode_attention  # noqa: E402
from vlcache.kernels.triton_gather import gather_kv  # noqa: E402
from vlcache.kernels.triton_merge import merge_kv  # noqa: E402
from vlcache.kernels.triton_similarity import similarity_assign  # noqa: E402
from vlcache.kernels.triton_stats import attention_stats  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4}  # both sides accumulate exact bf16 products in fp32
# (keys n, head dim d, GQA group g): every n, every d and every g appear at least once, and every d and g also in the
# fast set (`-m "not slow"`); the two shapes the CPU interpreter takes longest on (3-8 s each on 2 cores) run in the
# full suite
SHAPES = [(1, 64, 1), (63, 80, 4), (257, 128, 7), (63, 128, 1)] + [
    pytest.param(shape, marks=pytest.mark.slow, id=f"n{shape[0]}-d{shape[1]}-g{shape[2]}")
    for shape in ((1000, 64, 4), (257, 80, 7))
]


def _ids(shape):
    n, d, g = shape
    return f"n{n}-d{d}-g{g}"


def _randn(*shape, dtype, gen):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_attention_stats(shape, dtype):
    n, d, g = shape
    gen = torch.Generator().manual_seed(n * d + g)
    B, HK = 2, 1 if g == 7 else 2
    H = HK * g
    R = n if n <= 63 else 40  # every row where cheap; an observation window (not a multiple of a block) beyond
    q, k = _randn(B, H, R, d, dtype=dtype, gen=gen), _randn(B, HK, n, d, dtype=dtype, gen=gen)
    q_pos = torch.arange(n - R, n).expand(B, R).contiguous().to(DEVICE)
    k_valid = torch.ones(B, n, dtype=torch.bool, device=DEVICE)
    k_valid[1, : n // 5] = False  # row 1 is left-padded
    q_valid = k_valid[:, n - R :]
    got = attention_stats(q, k, d**-0.5, q_pos, k_valid, q_valid, with_sq=True, density_fraction=0.01)
    want = ref.attention_stats(q, k, d**-0.5, q_pos, k_valid, q_valid, with_sq=True, density_fraction=0.01)
    tol = TOL[dtype]
    torch.testing.assert_close(got.colsum, want.colsum, atol=tol, rtol=tol)
    torch.testing.assert_close(got.colsq, want.colsq, atol=tol, rtol=tol)
    torch.testing.assert_close(got.variance(), want.variance(), atol=tol, rtol=tol)
    torch.testing.assert_close(got.density, want.density, atol=1.0, rtol=0)  # a count; a borderline key may flip
    assert (got.density != want.density).float().mean() < 0.01


@pytest.mark.parametrize("splits", [2, 5])
def test_attention_stats_split_keys(splits):
    """The row pass split across key ranges (as on a GPU with few rows) combines to the same statistics; with 5
    splits of 257 keys some splits lie wholly beyond a row's causal end."""
    gen = torch.Generator().manual_seed(splits)
    n, R, d = 257, 40, 64
    q, k = _randn(2, 4, R, d, dtype=torch.float32, gen=gen), _randn(2, 2, n, d, dtype=torch.float32, gen=gen)
    q_pos = torch.arange(n - R - 100, n - 100).expand(2, R).contiguous().to(DEVICE)
    k_valid = torch.ones(2, n, dtype=torch.bool, device=DEVICE)
    k_valid[1, :30] = False
    tiles = dict(BLOCK_R=64, BLOCK_T=64)  # key tiles of 64, so that each of the 5 splits is a real range of keys
    got = attention_stats(
        q, k, d**-0.5, q_pos, k_valid, with_sq=True, density_fraction=0.01, splits=splits, config=tiles
    )
    want = ref.attention_stats(q, k, d**-0.5, q_pos, k_valid, with_sq=True, density_fraction=0.01)
    torch.testing.assert_close(got.colsum, want.colsum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.colsq, want.colsq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.density, want.density, atol=1.0, rtol=0)


def test_attention_stats_without_masks_and_no_rows():
    gen = torch.Generator().manual_seed(1)
    q, k = _randn(1, 4, 17, 64, dtype=torch.float32, gen=gen), _randn(1, 2, 17, 64, dtype=torch.float32, gen=gen)
    pos = torch.arange(17)[None].to(DEVICE)
    got, want = attention_stats(q, k, 0.125, pos), ref.attention_stats(q, k, 0.125, pos)
    torch.testing.assert_close(got.colsum, want.colsum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.colsum.sum(-1), torch.full((1, 4), 17.0, device=DEVICE))  # each row sums to 1
    empty = attention_stats(q[:, :, :0], k, 0.125, pos[:, :0])
    assert empty.colsum.abs().sum() == 0


def _kept(B, HK, T, K, gen):
    return torch.stack(
        [torch.stack([torch.randperm(T, generator=gen)[:K].sort().values for _ in range(HK)]) for _ in range(B)]
    ).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "T,d,K", [(1, 64, 1), (63, 80, 1), (257, 128, 40), (1000, 64, 100), (63, 64, 63)], ids=lambda x: str(x)
)
def test_similarity_assign_is_exact_on_tie_free_inputs(T, d, K, dtype):
    gen = torch.Generator().manual_seed(T + K)
    keys = _randn(2, 2, T, d, dtype=dtype, gen=gen)
    kept = _kept(2, 2, T, K, gen)
    a, s = similarity_assign(keys, kept)
    ra, rs = ref.similarity_assign(keys, kept)
    assert torch.equal(a, ra)  # random keys: no ties
    torch.testing.assert_close(s, rs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["average", "pivot", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,d,K", [(63, 80, 9), (257, 128, 1), (100, 64, 100)], ids=lambda x: str(x))
def test_merge_matches_reference(T, d, K, dtype, mode):
    gen = torch.Generator().manual_seed(T * K)
    keys, values = _randn(2, 2, T, d, dtype=dtype, gen=gen), _randn(2, 2, T, d, dtype=dtype, gen=gen)
    kept = _kept(2, 2, T, K, gen)
    merged = torch.ones(2, 2, T, dtype=torch.bool, device=DEVICE).scatter_(-1, kept, False)
    merged[1, :, : T // 3] = False  # some evicted entries are not merged (padding, merge filter)
    assign, sim = ref.similarity_assign(keys, kept)
    got = merge_kv(keys, values, kept, merged, assign, mode, sim)
    want = ref.merge_kv(keys, values, kept, merged, assign, mode, sim)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # one bf16 rounding of the result
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,d,K", [(1, 64, 1), (63, 80, 63), (257, 128, 1), (1000, 64, 300)], ids=lambda x: str(x))
def test_compaction_is_exact(T, d, K, dtype):
    gen = torch.Generator().manual_seed(T + d)
    keys, values = _randn(2, 3, T, d, dtype=dtype, gen=gen), _randn(2, 3, T, d // 2, dtype=dtype, gen=gen)
    kept = _kept(2, 3, T, K, gen)
    got = gather_kv(keys, values, kept)
    want = ref.gather_kv(keys, values, kept)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    empty = gather_kv(keys, values, kept[..., :0])
    assert empty[0].shape == (2, 3, 0, d)


def test_dispatcher_uses_the_reference_off_cuda(monkeypatch):
    assert kernels.backend("cpu") == "reference"
    monkeypatch.setenv("VLCACHE_KERNELS", "reference")
    assert kernels.backend("cuda") == "reference"


def test_the_dispatcher_chooses_triton_for_cuda_tensors_only(monkeypatch):
    """With Triton importable, a CUDA tensor goes to the Triton kernels (a fake one: no GPU needed); a CPU tensor,
    and a CUDA one under VLCACHE_KERNELS=reference, to the reference."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        cuda = torch.empty(1, device="cuda")
    monkeypatch.delenv("VLCACHE_KERNELS", raising=False)
    assert kernels._use_triton(cuda) and kernels.backend("cuda") == "triton"
    assert not kernels._use_triton(torch.empty(1))
    monkeypatch.setenv("VLCACHE_KERNELS", "reference")
    assert not kernels._use_triton(cuda) and kernels.backend("cuda") == "reference"


def _op_args(gen):
    from vlcache.quant import KVPart

    B, HK, g, R, T, d = 1, 2, 2, 3, 12, 8
    q, k = torch.randn(B, HK * g, R, d, generator=gen), torch.randn(B, HK, T, d, generator=gen)
    v = torch.randn(B, HK, T, d, generator=gen)
    kept = torch.tensor([[[0, 4, 9], [1, 2, 11]]])
    assign, sim = ref.similarity_assign(k, kept)
    merged = torch.ones(B, HK, T, dtype=torch.bool).scatter_(-1, kept, False)
    valid = torch.ones(B, HK, T, dtype=torch.bool)
    return {
        "attention_stats": (q, k, 0.3, torch.arange(T - R, T)[None]),
        "similarity_assign": (k, kept),
        "merge_kv": (k, v, kept, merged, assign, "weighted", sim),
        "gather_kv": (k, v, kept),
        "quantized_attention": (q, [KVPart(k, v)], 0.3),
        "decode_attention": (q, k, v, valid, 0.3),
    }


OPS = {
    "attention_stats": "triton_stats",
    "similarity_assign": "triton_similarity",
    "merge_kv": "triton_merge",
    "gather_kv": "triton_gather",
    "quantized_attention": "triton_quant",
    "decode_attention": "triton_decode_mass",
}


@pytest.mark.parametrize("op", list(OPS))
def test_each_op_runs_its_triton_kernel_when_the_dispatcher_says_triton(monkeypatch, op):
    """Every dispatcher op calls its Triton module's function (once, with the caller's arguments) when
    `_use_triton` says so; spied here on CPU tensors, the spy answering with the reference's result."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return getattr(ref, op)(*args, **kwargs)

    monkeypatch.setattr(kernels._triton_module(OPS[op]), op, spy)
    args = _op_args(torch.Generator().manual_seed(0))[op]
    want = getattr(kernels, op)(*args)  # CPU tensors: the reference, the spy untouched
    assert not calls
    monkeypatch.setattr(kernels, "_use_triton", lambda t: True)
    got = getattr(kernels, op)(*args)
    assert len(calls) == 1 and calls[0][0] is args[0]
    assert _tensors(got) and all(torch.equal(a, b) for a, b in zip(_tensors(got), _tensors(want), strict=True))


def _tensors(out):
    """The tensors of an op's result: a tensor, a tuple of them or None, or AttentionStats' fields."""
    if isinstance(out, kernels.AttentionStats):
        out = (out.colsum, out.colsq, out.density, out.rows)
    return [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]


# (slots T, head dim d, GQA group g, query rows R): one slot, a tile and one over (65), no power of two anywhere, and
# (1000 slots) four splits of four tiles each, the last split short
DECODE_SHAPES = [(1, 64, 1, 1), (65, 60, 4, 1), (130, 80, 7, 3), (200, 128, 2, 2), (1000, 64, 7, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "T{}-d{}-g{}-R{}".format(*s))
@pytest.mark.parametrize("causal", [False, True], ids=["rows-see-all", "causal-rows"])
def test_decode_attention_and_its_mass_match_the_reference(shape, dtype, causal):
    T, d, g, R = shape
    B, HK = 2, 2
    gen = torch.Generator().manual_seed(T + d + g + R)
    q = _randn(B, HK * g, R, d, dtype=dtype, gen=gen)
    k = _randn(B, HK, T, d, dtype=dtype, gen=gen)
    v = _randn(B, HK, T, d // 2 + 3, dtype=dtype, gen=gen)  # values of another width
    valid = (torch.rand(B, HK, T, generator=gen) > 0.3).to(DEVICE)
    valid[..., -1] = True
    valid[1, 1] = False  # a KV head that sees nothing: zeros, not NaN
    q_pos = torch.randint(0, T, (B, R), generator=gen).to(DEVICE) if causal else None
    out, mass = decode_attention(q, k, v, valid, d**-0.5, q_pos)
    want_out, want_mass = ref.decode_attention(q, k, v, valid, d**-0.5, q_pos)
    assert out.dtype == dtype and out.shape == want_out.shape and mass.shape == (B, HK, T)
    assert not torch.isnan(out).any() and not torch.isnan(mass).any()
    # bf16: 16-bit dots, the probabilities rounded to bf16 for the second, the output rounded once
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(mass, want_mass, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(out[1, g : 2 * g], torch.zeros_like(out[1, g : 2 * g])) and not mass[1, 1].any()
    alone, none = decode_attention(q, k, v, valid, d**-0.5, q_pos, mass=False)  # the output alone: no logits kept
    assert none is None and torch.equal(alone, out)


def test_decode_attention_splits_the_keys_over_programs():
    """Enough programs for the machine: a long cache at batch 1 is split into many ranges of whole tiles, none
    empty and none under MIN_TILES tiles (the combine walks the splits in turn); a short one is not split."""
    from vlcache.kernels import triton_decode_mass as tdm

    cpu = torch.device("cpu")
    n, per = tdm.splits(4, 1000, cpu)  # the interpreter asks for 16 programs: 4 heads x 4 splits
    assert (n, per) == (4, 256) and (n - 1) * per < 1000 <= n * per
    assert tdm.splits(4, 65, cpu) == (1, 128) and tdm.splits(64, 100_000, cpu) == (1, 100_032)
    assert tdm.splits(4, 9 * 64, cpu) == (2, 5 * 64)  # 9 tiles: 2 splits (of 5 and 4), not 4 of 2 or 3 of 3


def test_decode_mass_is_h2os_score_of_the_rows():
    """The reference's mass is group_reduce(colsum, Hk, "mean") of attention_stats over the same rows, and its output
    is softmax attention (the two passes it replaces)."""
    gen = torch.Generator().manual_seed(0)
    B, HK, g, R, T, d = 2, 2, 3, 2, 40, 16
    q, k = torch.randn(B, HK * g, R, d, generator=gen), torch.randn(B, HK, T, d, generator=gen)
    v = torch.randn(B, HK, T, d, generator=gen)
    valid = torch.rand(B, HK, T, generator=gen) > 0.2
    q_pos = torch.tensor([[30, 39], [20, 39]])
    out, mass = ref.decode_attention(q, k, v, valid, 0.25, q_pos)
    stats = ref.attention_stats(q, k, 0.25, q_pos, valid)
    torch.testing.assert_close(mass, ref.group_reduce(stats.colsum, HK, "mean"), atol=1e-6, rtol=1e-6)
    probs = ref.attention_probs(q, k, 0.25, q_pos, valid)
    want = torch.matmul(probs, v.repeat_interleave(g, dim=1))
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    assert kernels.decode_attention(q, k, v, valid, 0.25, q_pos)[1].equal(mass)  # the dispatcher, off CUDA
