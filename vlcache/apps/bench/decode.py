"""Decode benchmark: milliseconds per generated token of every policy, eager and compiled (`compile=True`: a
static-capacity cache and one torch.compile'd step, CUDA graphs on a GPU), as ratios to plain Hugging Face and to
the full cache of the same mode, measured in the same run.

    vlcache bench decode                                  # CPU: the speed benchmark's CPU model, 1K tokens
    vlcache bench decode --preset qwen2vl-7b              # GPU: Qwen2-VL-7B text dimensions, bf16, 8K..128K tokens
    vlcache bench decode --quick                          # tiny, for CI
    vlcache bench decode --sizes 32768 --batch 4 --policies snapkv,h2o:evict_every=16

The model and prompts are the speed benchmark's (a Qwen2-VL from a config, random weights; many 256-token images).
Times are medians over the decode steps, after a warm-up run of the same shape (compilation is one-time and left
out). The peer row is plain Hugging Face with its own static cache (`cache_implementation="static"`), which
transformers compiles by itself on CUDA (CUDA graphs) and leaves eager on a CPU. On a GPU each row also gives the fraction of the bandwidth bound it reaches: (weight bytes + kept KV bytes) /
measured copy bandwidth / step time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ...policies import POLICIES, make_policy, parse_settings
from .. import timed_run
from . import first_paragraph
from .figure import figure_row, series_style
from .speed import PRESETS, build_model, machine, prompt

SIZES = {"cpu": "1024", "quick": "300", "qwen2vl-7b": "8192,32768,131072"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vlcache bench decode", description=first_paragraph(__doc__))
    p.add_argument("--preset", default="cpu", choices=list(PRESETS))
    p.add_argument("--sizes", default=None, help="prompt lengths in tokens, comma-separated (default: per preset)")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1)")
    p.add_argument(
        "--policies",
        default=None,
        help='comma-separated, settings after a colon: "h2o,h2o:evict_every=16" (default: every policy)',
    )
    p.add_argument("--budget", type=float, default=0.1, help="keep this share of the prompt in every layer")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="the 'quick' preset and two policies unless given (CI)")
    p.add_argument("--out", default="out/decode")
    args = p.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    if args.batch < 1 or args.new_tokens < 2:
        p.error("--batch must be >= 1 and --new-tokens >= 2 (decode steps follow the first token)")
    if args.policies is None:
        args.policies = "snapkv,h2o" if args.quick else ",".join(n for n in POLICIES if n != "full")
    preset = PRESETS[args.preset]
    device = preset["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {args.preset} needs a GPU")
    sizes = [int(x) for x in (args.sizes or SIZES[args.preset]).split(",")]
    torch.manual_seed(0)
    model = build_model(preset, max(sizes))
    params = sum(q.numel() for q in model.parameters())
    weight_bytes = sum(q.numel() * q.element_size() for q in model.parameters())
    where, model_words, bandwidth = machine(device, preset, params)
    print(f"{where}; model: {model_words}; budget {args.budget}; batch {args.batch}; {args.new_tokens} new tokens")
    names = ["full"] + [x for x in args.policies.split(",") if x and x != "full"]

    def make(name):
        base, _, extra = name.partition(":")
        settings = parse_settings([x for x in extra.split(";") if x])
        return make_policy(base, **settings) if base == "full" else make_policy(base, budget=args.budget, **settings)

    def timed(inputs, policy, compiled):
        kw = dict(min_new_tokens=args.new_tokens, compile=compiled)
        timed_run.run(model, None, inputs, policy, args.new_tokens, **kw)  # warm-up (and compile) at this shape
        return timed_run.run(model, None, inputs, policy, args.new_tokens, **kw)

    rows = []
    out = Path(args.out)
    for n in sizes:
        one = prompt(model, n, device)
        inputs = {
            k: torch.cat([v] * args.batch) if k != "image_grid_thw" else v.repeat(args.batch, 1) for k, v in one.items()
        }
        real_n = inputs["input_ids"].shape[1]
        plain = timed(inputs, None, False).decode_ms_median
        peer = hf_static(model, inputs, args.new_tokens)
        full = {}
        for name in names:
            eager = timed(inputs, make(name), False)
            for mode, r in (("eager", eager), ("compiled", timed(inputs, make(name), True))):
                ms = r.decode_ms_median
                full.setdefault(mode, ms)  # "full" is first
                row = dict(n=real_n, batch=args.batch, policy=name, mode=mode, decode_ms=ms)
                row.update(vs_plain=ms / plain, vs_full=ms / full[mode], plain_ms=plain, hf_static_ms=peer)
                if peer:
                    row["vs_hf_static"] = ms / peer
                row["kv_bytes"] = r.prefill_stats.kv_bytes if r.prefill_stats else None
                row["same_tokens"] = r.tokens == eager.tokens
                if mode == "compiled":
                    row["speedup"] = eager.decode_ms_median / ms
                if bandwidth and row["kv_bytes"]:
                    row["bandwidth_fraction"] = (weight_bytes + row["kv_bytes"]) / (ms / 1000) / bandwidth
                rows.append(row)
        print_block(rows, real_n, plain, peer)
        out.mkdir(parents=True, exist_ok=True)  # after every size: a run stopped at its time limit keeps its rows
        setup = dict(device=where, preset=args.preset, parameters=params, budget=args.budget, batch=args.batch,
                     new_tokens=args.new_tokens)  # fmt: skip
        (out / "decode.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
        plot(rows, out / "decode.png", where)
    print(f"wrote {out / 'decode.json'} and {out / 'decode.png'}")
    return 0


def hf_static(model, inputs, new_tokens: int) -> float | None:
    """Plain Hugging Face's decode ms/token with its own static cache (compiled by transformers on CUDA), or None
    where this model and transformers cannot run it (said in one line)."""
    kw = dict(min_new_tokens=new_tokens, cache_implementation="static")
    try:
        timed_run.run(model, None, inputs, None, new_tokens, **kw)  # warm-up (and its compile)
        return timed_run.run(model, None, inputs, None, new_tokens, **kw).decode_ms_median
    except Exception as e:  # a peer row that cannot run must not cost the benchmark's own rows
        print(f"plain Hugging Face with its static cache could not run here: {type(e).__name__}: {e}")
        return None


def print_block(rows, n, plain, peer=None):
    with_peer = (
        f"; with its static cache{' (compiled)' if torch.cuda.is_available() else ''} {peer:.2f}" if peer else ""
    )
    print(f"\nprompt {n} tokens; plain Hugging Face {plain:.2f} ms/token{with_peer}")
    w = max(13, *(len(r["policy"]) for r in rows))
    print(
        f"{'policy':<{w}} {'eager ms/t':>11} {'x plain':>8} {'x full':>7} {'compiled':>9} {'x plain':>8} "
        f"{'x full':>7} {'speedup':>8} {'same':>5} {'bw frac':>8}"
    )
    for name in dict.fromkeys(r["policy"] for r in rows if r["n"] == n):
        e, c = (
            next(r for r in rows if r["n"] == n and r["policy"] == name and r["mode"] == m)
            for m in ("eager", "compiled")
        )
        bw = f"{c['bandwidth_fraction']:>8.2f}" if "bandwidth_fraction" in c else f"{'-':>8}"
        print(
            f"{name:<{w}} {e['decode_ms']:>11.2f} {e['vs_plain']:>8.2f} {e['vs_full']:>7.2f} {c['decode_ms']:>9.2f} "
            f"{c['vs_plain']:>8.2f} {c['vs_full']:>7.2f} {c['speedup']:>7.2f}x {str(c['same_tokens'])[0]:>5} {bw}"
        )


def plot(rows, path, title):
    sizes = sorted({r["n"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    with figure_row(path, 2, (11, 3.6), title) as axes:
        for i, name in enumerate(policies):
            style = series_style(i)
            for ax, mode in zip(axes, ("eager", "compiled")):
                pts = [r for r in rows if r["policy"] == name and r["mode"] == mode]
                ax.plot([r["n"] for r in pts], [r["decode_ms"] for r in pts], label=name, **style)
        for ax, mode in zip(axes, ("eager", "compiled")):
            ax.set_xscale("log", base=2) if len(sizes) > 1 else None
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel(f"decode, {mode} (ms / token)")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)


if __name__ == "__main__":
    sys.exit(main())
