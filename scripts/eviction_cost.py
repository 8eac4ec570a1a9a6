"""Cost of one decode step's cache work in one layer: append a token, then evict one, in place
(`CompressibleLayer.evict`) or by compaction.

    python scripts/eviction_cost.py            # the CPU benchmark's layer size and a 7B model's 10% of 128K
    python scripts/eviction_cost.py --device cuda

Each step appends a token and drops one random slot per KV head, as H2O and StreamingLLM do at their budget; the
median of 50 steps after 10 warm-up steps (`vlcache.apps.bench.kernels.timed`). The append is timed with the eviction
because compaction's cost shows partly there: its new tensors make the next append reallocate its buffer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlcache.apps.bench.kernels import timed  # noqa: E402
from vlcache.hf.cache import CompressibleLayer  # noqa: E402
from vlcache.policies.view import Eviction, Selection  # noqa: E402

SIZES = [(2, 840, 64, torch.float32), (4, 12800, 128, torch.bfloat16)]  # KV heads, slots, head dim, dtype


def step_us(in_place: bool, heads: int, slots: int, dim: int, dtype, device) -> float:
    layer = CompressibleLayer()
    kv = dict(dtype=dtype, device=device)
    layer.update(torch.randn(1, heads, slots, dim, **kv), torch.randn(1, heads, slots, dim, **kv))
    layer.compact(Selection(torch.arange(slots, device=device).expand(1, heads, slots)))  # as after a prefill
    new_k, new_v = torch.randn(1, heads, 1, dim, **kv), torch.randn(1, heads, 1, dim, **kv)

    def step():
        layer.update(new_k, new_v)
        n = layer.physical_length
        drop = torch.randint(0, n, (1, heads, 1), device=device)
        if in_place:
            layer.evict(Eviction(drop))
        else:
            keep = torch.ones(1, heads, n, dtype=torch.bool, device=device).scatter_(-1, drop, False)
            layer.compact(Selection(torch.arange(n, device=device).expand(1, heads, n)[keep].view(1, heads, n - 1)))

    return timed(step, device.type, reps=50, warmup=10) * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print("| KV heads x slots x head dim | dtype | compaction us | in place us | ratio |\n|---|---|---|---|---|")
    for heads, slots, dim, dtype in SIZES:
        slow = step_us(False, heads, slots, dim, dtype, device)
        fast = step_us(True, heads, slots, dim, dtype, device)
        print(f"| {heads} x {slots} x {dim} | {str(dtype)[6:]} | {slow:.0f} | {fast:.0f} | {slow / fast:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
