"""Kernel benchmark: each Triton kernel against its PyTorch reference, time, bandwidth and peak memory.

    vlcache bench kernels                        # GPU: n = 4K..128K, H=28, Hk=4, d=128, bf16 (or benchmarks/kernels.py)
    vlcache bench kernels --device cpu           # CPU: the references at small n (Triton needs a GPU)

Ops (the shapes of a Qwen2-VL-7B layer):
- stats-window: attention column sums from a 32-row observation window (SnapKV, CAKE): memory-bound, reads K;
- stats-all: column sums over every prompt row (H2O, LOOK-M, Elastic): compute-bound, 2 H d n^2 FLOPs (causal);
- assign: each of n keys to its most similar of n/10 kept keys (LOOK-M);
- merge: 90% of the entries folded into the kept 10% (pivot merge);
- gather: compaction to 10% of the entries (keys and values of every head);
- decode, decode-mass: one decode step's attention over n slots (compiled decode's kernel, flash-decoding), with and
  without each slot's attention mass; beside them SDPA as transformers calls it for a step with a mask: the query
  heads packed onto their KV head (`sdpa`, eager) or the keys repeated per query head (`sdpa-repeat`, what it does
  under a compiler). Memory-bound: reads K and V once.

Bandwidth is the fewest bytes the op must move (each input read once, each output written once) over the median
time, and its fraction of the device's measured copy bandwidth (read + write of a large device-to-device copy).
Prints a table, writes <out>/kernels.json and <out>/kernels.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ...kernels import reference as ref
from . import first_paragraph, token_counts
from .figure import figure_row


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps: int, warmup: int = 2) -> float:
    """Median seconds of `fn` over `reps` runs after `warmup`."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_bytes(fn, device) -> int:
    if device != "cuda":
        return -1
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    n = (1 << 28) if device == "cuda" else (1 << 26)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), device, reps=10)
    return 2 * n / t


OPS = ("stats-window", "stats-all", "assign", "merge", "gather", "decode", "decode-mass")


def cases(n: int, H: int, HK: int, d: int, dtype, device, ops=OPS):
    """op -> (run it with an implementation, bytes it must move, FLOPs) for the ops asked for."""
    g = torch.Generator(device="cpu").manual_seed(n)
    el = torch.empty(0, dtype=dtype).element_size()
    k = torch.randn(1, HK, n, d, generator=g).to(dtype).to(device)
    v = torch.randn(1, HK, n, d, generator=g).to(dtype).to(device)
    w = 32
    qw = torch.randn(1, H, w, d, generator=g).to(dtype).to(device)
    pos_w = torch.arange(n - w, n, device=device)[None]
    kept_n = max(1, n // 10)
    kept = torch.randperm(n, generator=g)[:kept_n].sort().values.expand(1, HK, kept_n).contiguous().to(device)
    merged = torch.ones(1, HK, n, dtype=torch.bool, device=device).scatter_(-1, kept, False)
    out = {
        "stats-window": (
            lambda impl: impl.attention_stats(qw, k, d**-0.5, pos_w),
            HK * n * d * el + w * H * d * el + H * n * 4,
            2 * 2 * H * w * n * d,
        ),
        "assign": (
            lambda impl: impl.similarity_assign(k, kept),
            HK * (n + kept_n) * d * el + HK * n * 12,
            2 * HK * n * kept_n * d,
        ),
        "gather": (lambda impl: impl.gather_kv(k, v, kept), 2 * 2 * HK * kept_n * d * el + HK * kept_n * 8, 0),
    }
    if "merge" in ops:  # its assignment, computed once by the reference: seconds at 128K, only when asked
        assign = ref.similarity_assign(k, kept)
        out["merge"] = (
            lambda impl: impl.merge_kv(k, v, kept, merged, assign[0], "pivot"),
            2 * HK * n * d * el + 2 * HK * kept_n * d * el + HK * n * 9,
            0,
        )
    qd = torch.randn(1, H, 1, d, generator=g).to(dtype).to(device)
    valid = torch.ones(1, HK, n, dtype=torch.bool, device=device)
    valid[..., ::7] = False  # some slots masked, as a compressed cache's room and padding are
    kv_bytes = 2 * HK * n * d * el + 2 * H * d * el
    out["decode"] = (lambda impl: impl.decode_attention(qd, k, v, valid, d**-0.5, None, False), kv_bytes, 4 * H * n * d)
    out["decode-mass"] = (
        lambda impl: impl.decode_attention(qd, k, v, valid, d**-0.5, None, True),
        kv_bytes + HK * n * 4,
        4 * H * n * d,
    )
    if n <= 32768 and "stats-all" in ops:  # every row: quadratic, the largest sizes take the reference minutes
        q = torch.randn(1, H, n, d, generator=g).to(dtype).to(device)
        pos = torch.arange(n, device=device)[None]
        out["stats-all"] = (
            lambda impl: impl.attention_stats(q, k, d**-0.5, pos),
            H * n * d * el + HK * n * d * el + H * n * 4,
            2 * 2 * H * n * n * d // 2,
        )
    return {op: case for op, case in out.items() if op in ops}


class Sdpa:
    """A decode step's attention as transformers runs it with a mask: query heads packed onto their KV head (eager)."""

    @staticmethod
    def decode_attention(q, k, v, valid, scale, q_pos, mass):
        if mass:
            raise NotImplementedError
        B, H, _, d = q.shape
        packed = q.view(B, k.shape[1], H // k.shape[1], d)
        out = torch.nn.functional.scaled_dot_product_attention(
            packed, k, v, attn_mask=valid[:, :, None, :], scale=scale
        )
        return out.view(B, H, 1, -1), None


class SdpaRepeat:
    """The same with the keys and values repeated per query head (what transformers does under a compiler)."""

    @staticmethod
    def decode_attention(q, k, v, valid, scale, q_pos, mass):
        if mass:
            raise NotImplementedError
        g = q.shape[1] // k.shape[1]
        mask = valid.repeat_interleave(g, dim=1)[:, :, None, :]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vlcache bench kernels", description=first_paragraph(__doc__))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default=None, help="comma-separated n (default: 4K..128K on GPU, 512..4K on CPU)")
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--ops", default=None, help="comma-separated ops to run (default: all; see the list above)")
    p.add_argument("--out", default="out/kernels")
    args = p.parse_args(argv)
    device = args.device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    default = "4096,8192,16384,32768,65536,131072" if device == "cuda" else "512,1024,2048,4096"
    sizes = token_counts(p, "--sizes", default if args.sizes is None else args.sizes)
    if args.reps < 1:
        p.error(f"--reps must be at least 1, got {args.reps}")
    ops = set(args.ops.split(",")) if args.ops else set(OPS)
    if not ops <= set(OPS):
        p.error(f"--ops: unknown {sorted(ops - set(OPS))}; known: {', '.join(OPS)}")
    impls = {"reference": ref}
    if device == "cuda":
        from ...kernels import triton_decode_mass, triton_gather, triton_merge, triton_similarity, triton_stats

        class Triton:
            attention_stats = staticmethod(triton_stats.attention_stats)
            similarity_assign = staticmethod(triton_similarity.similarity_assign)
            merge_kv = staticmethod(triton_merge.merge_kv)
            gather_kv = staticmethod(triton_gather.gather_kv)
            decode_attention = staticmethod(triton_decode_mass.decode_attention)

        impls["triton"] = Triton
    impls.update(sdpa=Sdpa, **{"sdpa-repeat": SdpaRepeat})  # decode only
    peak_bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device: {name}; measured copy bandwidth {peak_bw / 1e9:.0f} GB/s; H={args.heads} Hk={args.kv_heads} d={args.dim} {args.dtype}"
    )
    rows = []
    out = Path(args.out)
    meta = dict(
        device=name,
        copy_bandwidth_gbps=peak_bw / 1e9,
        heads=args.heads,
        kv_heads=args.kv_heads,
        dim=args.dim,
        dtype=args.dtype,
    )

    def save():  # after every row: a run stopped at its time limit keeps what it measured
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels.json").write_text(json.dumps({"setup": meta, "rows": rows}, indent=2) + "\n")

    header = f"{'op':<13} {'n':>7} {'impl':<11} {'ms':>9} {'GB/s':>8} {'of peak':>8} {'TFLOP/s':>8} {'peak MiB':>9} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for n in sizes:
        for op, (fn, nbytes, flops) in cases(n, args.heads, args.kv_heads, args.dim, dtype, device, ops).items():
            base = None
            for impl_name, impl in impls.items():
                if impl_name.startswith("sdpa") and op != "decode":
                    continue
                if op == "stats-all" and impl_name == "reference" and n > 16384 and device == "cuda":
                    continue
                reps = args.reps if n <= 16384 or op != "stats-all" else 3
                t = timed(lambda fn=fn, impl=impl: fn(impl), device, reps=reps)
                mem = peak_bytes(lambda fn=fn, impl=impl: fn(impl), device)
                base = base or t
                row = dict(op=op, n=n, impl=impl_name, ms=1000 * t, gbps=nbytes / t / 1e9, frac=nbytes / t / peak_bw,
                           tflops=flops / t / 1e12 if flops else 0.0, peak_mib=mem / 2**20 if mem >= 0 else None, speedup=base / t)  # fmt: skip
                rows.append(row)
                save()
                print(
                    f"{op:<13} {n:>7} {impl_name:<11} {row['ms']:>9.3f} {row['gbps']:>8.1f} {100 * row['frac']:>7.1f}% "
                    f"{row['tflops']:>8.2f} {row['peak_mib'] if row['peak_mib'] is not None else float('nan'):>9.1f} {row['speedup']:>7.2f}x"
                )
    save()  # also when no row ran
    plot(rows, out / "kernels.png", name)
    print(f"wrote {out / 'kernels.json'} and {out / 'kernels.png'}")
    return 0


def plot(rows, path, title):
    ops = sorted({r["op"] for r in rows})
    with figure_row(path, len(ops), (4 * len(ops), 3.4), title) as axes:
        for ax, op in zip(axes, ops):
            for impl, style in (("reference", "o--"), ("triton", "s-"), ("sdpa", "^:"), ("sdpa-repeat", "v:")):
                pts = [(r["n"], r["ms"]) for r in rows if r["op"] == op and r["impl"] == impl]
                if pts:
                    ax.plot(*zip(*pts), style, label=impl)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(op)
            ax.set_xlabel("n (keys)")
            ax.set_ylabel("ms")
            ax.grid(alpha=0.3)
            ax.legend()


if __name__ == "__main__":
    sys.exit(main())
