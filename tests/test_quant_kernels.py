"""The quantized decode attention: Triton (codes dequantized in registers) against its PyTorch reference on awkward
shapes, under TRITON_INTERPRET=1 on the CPU and natively on a GPU (scripts/gpu_check.sh quant)."""

import pytest
import torch

triton = pytest.importorskip("triton")

from vlcache.kernels import reference as ref  # noqa: E402
from vlcache.kernels.triton_quant import quantized_attention, segment_attention  # noqa: E402
from vlcache.quant import KVPart, quantize  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # bf16: the output is rounded once to bf16
# (slots N, head dim d, group G, GQA group g)
SHAPES = [(63, 60, 12, 4), (1, 64, 32, 1), (130, 128, 32, 7), (64, 16, 16, 2)]


def _ids(shape):
    return "N{}-d{}-G{}-g{}".format(*shape)


def _inputs(shape, dtype, bits, axis, seed, rows=2):
    N, d, G, g = shape
    gen = torch.Generator().manual_seed(seed)
    B, HK = 2, 1 if g == 7 else 2
    q = torch.randn(B, HK * g, rows, d, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(B, HK, N, d, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(B, HK, N, d, generator=gen).to(dtype).to(DEVICE)
    valid = (torch.rand(B, HK, N, generator=gen) > 0.25).to(DEVICE)
    valid[1, :, : N // 3] = False  # a left-padded row
    valid[0, 0, :] = N == 1 or valid[0, 0, :]  # keep the one-slot case visible somewhere
    kq = quantize(k, bits, G, "channel", valid)
    vq = quantize(v, bits, G, axis, valid)
    return q, kq, vq, valid


# every shape, every width and both dtypes appear (the interpreter runs ~1.5 ms per program instance: not all pairs)
CASES = [
    (SHAPES[0], 8, torch.float32),
    (SHAPES[0], 4, torch.bfloat16),
    (SHAPES[0], 2, torch.float32),
    (SHAPES[1], 2, torch.bfloat16),
    (SHAPES[2], 4, torch.float32),
    (SHAPES[2], 8, torch.bfloat16),
    (SHAPES[3], 2, torch.float32),
]


@pytest.mark.parametrize("shape,bits,dtype", CASES, ids=[f"{_ids(s)}-{b}bit-{str(t)[6:]}" for s, b, t in CASES])
def test_segment_kernel_matches_reference(shape, dtype, bits):
    q, kq, vq, valid = _inputs(shape, dtype, bits, "token", seed=sum(shape) + bits)
    B, H, R, d = q.shape
    out = torch.full((B, H, R, d), float("nan"), device=DEVICE)  # unwritten entries fail
    lse = torch.full((B, H, R), float("nan"), device=DEVICE)
    segment_attention(q, kq, vq, valid, d**-0.5, out=out, lse=lse)
    want = ref.quantized_attention(q, [KVPart(kq, vq, valid[:, :, None])], d**-0.5)
    torch.testing.assert_close(out.to(dtype).float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])
    sees = valid.any(-1).repeat_interleave(H // valid.shape[1], dim=1)[..., None].expand(B, H, R)
    assert torch.isfinite(lse[sees]).all() and (lse[~sees] == float("-inf")).all()


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=_ids)
def test_parts_combine_like_one_softmax(shape, axis):
    """A quantized segment (values per slot or per channel, a group index after an eviction), a plain segment and
    a causal window of new rows, combined by log-sum-exp, equal the reference's single softmax over all of them."""
    q, kq, vq, valid = _inputs(shape, torch.float32, 4, axis, seed=7)
    B, H, R, d = q.shape
    HK = kq.codes.shape[1]
    keep = torch.arange(kq.slots - 1, -1, -2, device=DEVICE).flip(0).expand(B, HK, -1)  # every other slot
    kq, vq, valid = kq.gather(keep), vq.gather(keep), valid.gather(-1, keep)
    gen = torch.Generator().manual_seed(1)
    dense_k, dense_v = (torch.randn(B, HK, 5, d, generator=gen).to(DEVICE) for _ in range(2))
    win_k, win_v = (torch.randn(B, HK, 3 + R, d, generator=gen).to(DEVICE) for _ in range(2))
    n = 3 + R
    causal = torch.arange(n, device=DEVICE)[None, :] <= torch.arange(n - R, n, device=DEVICE)[:, None]
    parts = [
        KVPart(kq, vq, valid[:, :, None]),
        KVPart(dense_k, dense_v, None),
        KVPart(win_k, win_v, causal[None, None].expand(B, HK, R, n)),
    ]
    got = quantized_attention(q, parts, d**-0.5)
    want = ref.quantized_attention(q, parts, d**-0.5)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
