"""Time the attention-statistics kernel under a few tile configurations on a GPU (a tuning aid, not a benchmark).

python scripts/tune_stats.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlcache.apps.bench.kernels import timed  # noqa: E402
from vlcache.kernels.triton_stats import attention_stats  # noqa: E402

CONFIGS = [
    dict(BLOCK_R=32, BLOCK_T=32, num_warps=4, num_stages=1),
    dict(BLOCK_R=64, BLOCK_T=64, num_warps=4, num_stages=2),
    dict(BLOCK_R=64, BLOCK_T=64, num_warps=4, num_stages=3),
    dict(BLOCK_R=64, BLOCK_T=128, num_warps=8, num_stages=2),
    dict(BLOCK_R=128, BLOCK_T=64, num_warps=8, num_stages=2),
    dict(BLOCK_R=128, BLOCK_T=128, num_warps=8, num_stages=2),
    dict(BLOCK_R=32, BLOCK_T=128, num_warps=4, num_stages=2),
]

H, HK, D = 28, 4, 128
for name, n, rows in (("window", 131072, 32), ("all", 16384, 16384)):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, HK, n, D, generator=g).bfloat16().cuda()
    q = torch.randn(1, H, rows, D, generator=g).bfloat16().cuda()
    pos = torch.arange(n - rows, n, device="cuda")[None]
    flops = 2 * 2 * H * rows * n * D // (2 if rows == n else 1)
    for cfg in CONFIGS:
        for dens in (None, 0.01):
            try:
                t = timed(
                    lambda q=q, k=k, pos=pos, dens=dens, cfg=cfg: attention_stats(
                        q, k, D**-0.5, pos, density_fraction=dens, config=cfg
                    ),
                    "cuda",
                    5,
                )
                print(
                    f"{name:7s} n={n:6d} dens={dens!s:5s} {cfg}  {t * 1e3:8.3f} ms  {flops / t / 1e12:6.1f} TFLOP/s",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001  (a config that does not fit: report and go on)
                print(f"{name:7s} {cfg} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
