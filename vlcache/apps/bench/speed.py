"""Speed and memory benchmark: prefill time, decode time per token, end-to-end time, KV bytes and peak memory of
every policy, as ratios to the full cache (and end to end to plain Hugging Face) measured in the same run.

    vlcache bench speed                              # CPU preset: ~25M-parameter model, 1K..16K-token prompts
    vlcache bench speed --preset qwen2vl-7b          # GPU: Qwen2-VL-7B text dimensions, bf16, 8K..128K tokens
    vlcache bench speed --quick                      # tiny, for CI
    vlcache bench speed --sizes 8192 --vision-budget 0.1 --new-tokens 32 \
        --policies "snapkv,snapkv:prune_at=2,vlcache:prune_at=2"   # prefill cut inside the language model
    vlcache bench speed --scene static --policies "full:temporal_merge=0.9"   # repeated frames, merged before it

The model is a Qwen2-VL built from a config with random weights (speed does not depend on them) and a one-layer
vision tower; prompts are many images of 256 tokens each plus a question. Peak memory is what the run allocates
on top of the model: torch.cuda's peak on a GPU; on a CPU, the peak of live tensor storage seen by a dispatch mode
(buffers internal to fused kernels are not seen). "KV peak" is the cache's own high-water mark during the request
(`CompressionStats.kv_bytes_peak`): what a policy controls, apart from the prefill's activations. On a GPU, decode also reports the bandwidth it achieves
(weights + KV read per token, over the measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch
import transformers as T

from ... import testing
from ...policies import POLICIES, make_policy, parse_settings
from .. import timed_run
from . import first_paragraph, token_counts
from .figure import figure_row, series_style
from .memprobe import PeakTensorMemory

PRESETS = {
    # text tower dims; the vision tower is always tiny
    "cpu": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, dtype="fp32", device="cpu", sizes="1024,2048,4096,8192,16384"),
    "qwen2vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, dtype="bf16", device="cuda", sizes="8192,16384,32768,65536,131072"),
    "quick": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, dtype="fp32", device="cpu", sizes="512,1024"),
}  # fmt: skip
GRID = 32  # patches per image side: 32 * 32 / 4 = 256 tokens per image


class Bench(NamedTuple):
    """The model a speed or decode run times, with what its tables are headed by and divided by."""

    model: torch.nn.Module
    params: int
    weight_bytes: int  # what one decode step reads besides the cache: the bandwidth bound's first term
    where: str  # the device, in words
    model_words: str
    bandwidth: float | None  # measured copy bandwidth in bytes/s on CUDA, else None


def bench_model(name: str, preset: dict, max_tokens: int) -> Bench:
    """Seed, build preset `name`'s model for prompts up to `max_tokens`, and measure the machine: the head of this
    benchmark's runs and of the decode one's. Refuses a CUDA preset where there is no GPU."""
    device = preset["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {name} needs a GPU")
    torch.manual_seed(0)
    model = build_model(preset, max_tokens)
    params = sum(q.numel() for q in model.parameters())
    weight_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    bandwidth = None
    if device == "cuda":
        from .kernels import copy_bandwidth

        bandwidth = copy_bandwidth("cuda")
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    words = (
        f"Qwen2-VL text {preset['num_hidden_layers']}x{preset['hidden_size']} "
        f"({params / 1e6:.1f}M parameters, {preset['dtype']})"
    )
    return Bench(model, params, weight_bytes, where, words, bandwidth)


def build_model(preset: dict, max_tokens: int):
    dims = {
        k: preset[k]
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    }
    text = T.Qwen2VLTextConfig(
        **testing.models.text_kwargs(max_position_embeddings=max_tokens + 1024, **dims),
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": _mrope(dims)},
    )
    vision = T.Qwen2VLVisionConfig(
        depth=1,
        embed_dim=32,
        hidden_size=dims["hidden_size"],
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    cfg = T.Qwen2VLConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), image_token_id=testing.models.IMG, video_token_id=testing.models.VID,
        vision_start_token_id=testing.models.VSTART, vision_end_token_id=testing.models.VEND,
    )  # fmt: skip
    dtype = torch.bfloat16 if preset["dtype"] == "bf16" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a 7B model never exists in fp32
    try:
        with torch.device(preset["device"]):
            model = T.Qwen2VLForConditionalGeneration(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def _mrope(dims) -> list[int]:
    half = dims["hidden_size"] // dims["num_attention_heads"] // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def prompt(model, n_tokens: int, device, scene: str = "random") -> dict:
    """Frames as images of 256 tokens each, a text marker before each, then a question. scene "random": every
    frame its own random pixels (nothing to merge); "static": every frame the first one plus 1% noise, as a
    fixed camera gives (what temporal merging removes)."""
    images = max(1, n_tokens // (GRID * GRID // 4))
    segs = []
    for i in range(images):
        segs += [f"f{i}", testing.IMAGE]
    ex = testing.make_inputs(model, segs + [" what happens in the video?"], qwen_grid=GRID)
    if scene == "static":
        pv = ex.inputs["pixel_values"]
        per = GRID * GRID
        noise = torch.randn(pv.shape, generator=torch.Generator().manual_seed(1)) * 0.01 * pv.std()
        ex.inputs["pixel_values"] = pv[:per].repeat(images, 1) + noise
    return {k: v.to(device) for k, v in ex.inputs.items()}


def measure(model, inputs, policy, new_tokens: int, device, repeat: int = 1) -> dict:
    """One policy's figures; times are medians over `repeat` runs (a shared machine is noisy)."""

    def run():
        return timed_run.run(model, None, inputs, policy, new_tokens, min_new_tokens=new_tokens)

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        runs = [run()]
        peak = torch.cuda.max_memory_allocated() - base
    else:
        runs = [run()]  # timed alone: the memory probe below slows every op down
        with PeakTensorMemory() as probe:
            run()
        peak = probe.peak
    runs += [run() for _ in range(repeat - 1)]
    r = runs[0]
    kv = r.prefill_stats.kv_bytes if r.prefill_stats else None
    kv_peak = r.prefill_stats.kv_bytes_peak if r.prefill_stats else None
    merged = sum(r.prefill_stats.merged.values()) if r.prefill_stats else 0
    return dict(
        prefill_s=_median([x.prefill_s for x in runs]),
        decode_ms=_median([x.decode_ms_per_token for x in runs]),
        total_s=_median([x.total_s for x in runs]),
        kv_bytes=kv,
        kv_peak_bytes=kv_peak,
        peak_bytes=peak,
        merged=merged,
        tokens=r.tokens,
    )


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vlcache bench speed", description=first_paragraph(__doc__))
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="default cpu (--quick: quick)")
    p.add_argument("--sizes", default=None, help="prompt lengths in tokens (comma-separated)")
    p.add_argument(
        "--policies",
        default=None,
        help='comma-separated; settings after a colon, ";" between them: "h2o,h2o:evict_every=16" (default: every '
        "policy, and snapkv and vlcache with prune_at=2)",
    )
    p.add_argument("--budget", type=float, default=0.1, help="keep this share of the prompt in every layer")
    p.add_argument(
        "--vision-budget", type=float, default=None, help="keep this share of the vision tokens and all text instead"
    )
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--scene", default="random", choices=("random", "static"), help="frames: random, or one repeated")
    p.add_argument("--repeat", type=int, default=1, help="runs per cell; times are their medians")
    p.add_argument(
        "--quick", action="store_true", help="the 'quick' preset and two policies, unless given (what CI runs)"
    )
    p.add_argument("--out", default="out/speed")
    args = p.parse_args(argv)
    if args.preset is None:  # --quick supplies what was not given; an explicit flag wins
        args.preset = "quick" if args.quick else "cpu"
    if args.policies is None:
        every = [*(n for n in POLICIES if n != "full"), "snapkv:prune_at=2", "vlcache:prune_at=2"]
        args.policies = "snapkv,h2o" if args.quick else ",".join(every)
    preset = PRESETS[args.preset]
    device = preset["device"]
    sizes = token_counts(
        p, "--sizes", preset["sizes"] if args.sizes is None else args.sizes
    )  # "" is an error, not the preset
    for flag, value in (("--repeat", args.repeat), ("--new-tokens", args.new_tokens)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    names = ["plain", "full"] + [x.strip() for x in args.policies.split(",") if x.strip() and x.strip() != "full"]
    amount = {"vision_budget": args.vision_budget} if args.vision_budget is not None else {"budget": args.budget}
    amount_label = ", ".join(f"{k} {v}" for k, v in amount.items())

    def make(name):
        if name == "plain":
            return None
        base, _, extra = name.partition(":")  # "h2o:evict_every=16": settings after the name
        settings = parse_settings([x for x in extra.split(";") if x])
        return make_policy(base, **settings) if base == "full" else make_policy(base, **amount, **settings)

    try:  # a bad budget, policy name or setting is the user's error, said before anything is built
        make_policy("snapkv", **amount)
    except ValueError as e:
        p.error(f"{'--vision-budget' if args.vision_budget is not None else '--budget'}: {e}")
    for name in names:
        try:
            make(name)
        except (ValueError, TypeError, KeyError) as e:
            p.error(f"--policies {name!r}: {e}")
    model, params, weight_bytes, where, model_words, bandwidth = bench_model(args.preset, preset, max(sizes))
    print(f"{where}; model: {model_words}; {amount_label}; {args.new_tokens} new tokens; {args.scene} frames")
    rows = []

    for i, n in enumerate(sizes):
        inputs = prompt(model, n, device, args.scene)
        real_n = inputs["input_ids"].shape[1]
        timed_run.run(model, None, inputs, None, 2)  # warm-up: one-time costs stay out of the numbers
        if i == 0:  # and each policy's own (Triton compiles, autotuning): without this, H2O's first
            # prefill on an H100 (8K tokens) measured 3.2 s, longer than its 33K one
            for name in names[1:]:
                timed_run.run(model, None, inputs, make(name), 2)
        base = plain = None
        for name in names:
            m = measure(model, inputs, make(name), args.new_tokens, device, args.repeat)
            if name == "full":
                base = m
            if name == "plain":
                plain = m
            row = dict(n=real_n, policy=name, **{k: v for k, v in m.items() if k != "tokens"})
            row["total_vs_plain"] = m["total_s"] / plain["total_s"]
            if base is not None:
                row.update(
                    prefill_ratio=m["prefill_s"] / base["prefill_s"],
                    decode_ratio=m["decode_ms"] / base["decode_ms"],
                    kv_ratio=(m["kv_bytes"] / base["kv_bytes"]) if m["kv_bytes"] else None,
                    kv_peak_ratio=(m["kv_peak_bytes"] / base["kv_peak_bytes"]) if m["kv_peak_bytes"] else None,
                    peak_ratio=m["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else None,
                    agreement=sum(a == b for a, b in zip(m["tokens"], base["tokens"])) / len(base["tokens"]),
                )
            if bandwidth and m["kv_bytes"]:
                per_token = weight_bytes + m["kv_bytes"]
                row["decode_bandwidth_fraction"] = per_token / (m["decode_ms"] / 1000) / bandwidth
            rows.append(row)
        print_block(rows, real_n)
        # after every size: a run stopped at its time limit keeps what it measured
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        setup = dict(
            device=where,
            preset=args.preset,
            parameters=params,
            **amount,
            new_tokens=args.new_tokens,
            scene=args.scene,
            repeat=args.repeat,
        )
        (out / "speed.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
        plot(rows, out / "speed.png", where)
    print(f"wrote {out / 'speed.json'} and {out / 'speed.png'}")
    return 0


def print_block(rows, n):
    print(f"\nprompt {n} tokens")
    w = max(13, *(len(r["policy"]) for r in rows))
    print(
        f"{'policy':<{w}} {'prefill s':>10} {'x full':>7} {'decode ms/t':>12} {'x full':>7} {'e2e s':>8} {'x plain':>7} "
        f"{'KV MiB':>8} {'x full':>7} {'KV peak':>8} {'x full':>7} {'peak MiB':>9} {'x full':>7} {'merged':>7} "
        f"{'agree':>6}"
    )
    for r in rows:
        if r["n"] != n:
            continue

        def ratio(key, r=r):
            return f"{r[key]:>7.2f}" if r.get(key) is not None else f"{'-':>7}"

        kv = f"{r['kv_bytes'] / 2**20:>8.1f}" if r["kv_bytes"] else f"{'-':>8}"
        kv_peak = f"{r['kv_peak_bytes'] / 2**20:>8.1f}" if r.get("kv_peak_bytes") else f"{'-':>8}"
        agree = f"{r['agreement']:>6.2f}" if "agreement" in r else f"{'-':>6}"
        print(
            f"{r['policy']:<{w}} {r['prefill_s']:>10.3f} {ratio('prefill_ratio')} {r['decode_ms']:>12.2f} {ratio('decode_ratio')} "
            f"{r['total_s']:>8.3f} {ratio('total_vs_plain')} "
            f"{kv} {ratio('kv_ratio')} {kv_peak} {ratio('kv_peak_ratio')} {r['peak_bytes'] / 2**20:>9.1f} {ratio('peak_ratio')} {r.get('merged', 0):>7} {agree}"
        )


def plot(rows, path, title):
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    with figure_row(path, 4, (17, 3.6), title) as axes:
        for i, name in enumerate(policies):
            pts = [r for r in rows if r["policy"] == name]
            ns = [r["n"] for r in pts]
            style = series_style(i)
            axes[0].plot(ns, [r["prefill_s"] for r in pts], label=name, **style)
            axes[1].plot(ns, [r["decode_ms"] for r in pts], label=name, **style)
            axes[2].plot(ns, [r.get("total_s", float("nan")) for r in pts], label=name, **style)
            axes[3].plot(ns, [r["peak_bytes"] / 2**20 for r in pts], label=name, **style)
        labels = ("prefill (s)", "decode (ms / token)", "end to end (s)", "peak memory (MiB)")
        for ax, label in zip(axes, labels):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[3].legend(fontsize=7)


if __name__ == "__main__":
    sys.exit(main())
