"""Decode benchmark: milliseconds per generated token of every policy, eager and compiled (`compile=True`: a
static-capacity cache and one torch.compile'd step, CUDA graphs on a GPU), as ratios to plain Hugging Face and to
the full cache of the same mode, measured in the same run.

    vlcache bench decode                                  # CPU: the speed benchmark's CPU model, 1K tokens
    vlcache bench decode --preset qwen2vl-7b              # GPU: Qwen2-VL-7B text dimensions, bf16, 8K..128K tokens
    vlcache bench decode --quick                          # tiny, for CI
    vlcache bench decode --sizes 32768 --batch 4 --policies snapkv,h2o:evict_every=16

The model and prompts are the speed benchmark's (a Qwen2-VL from a config, random weights; many 256-token images).
A row's ms/token is its mean decode step after the first three (`steady_ms`; with the default 36 new tokens, 32
steps: an eviction every 16 or 32 steps is counted as often as it happens). Each row has an untimed warm-up run at the
first size it runs (`--warmup`): one compile serves every length. The peer row is plain Hugging Face with its own
static cache (`cache_implementation="static"`), which transformers compiles by itself on CUDA (CUDA graphs) and leaves
eager on a CPU. On a GPU each row also gives the bandwidth bound, (weight bytes + kept KV bytes) / measured copy
bandwidth, the fraction of it the step reaches, the peak memory the run needs (the weights plus its own peak above
what was allocated before it), and how many steady steps replayed a CUDA graph (graph_calls.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from ...policies import POLICIES, make_policy, parse_settings
from .. import timed_run
from . import first_paragraph, token_counts
from .figure import figure_row, series_style
from .graph_calls import GraphCalls, all_replayed
from .speed import PRESETS, bench_model, prompt

SIZES = {"cpu": "1024", "quick": "300", "qwen2vl-7b": "8192,32768,131072"}
SKIP = 3  # decode steps before the steady state (see steady_ms)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with --sizes a list and --eager-sizes and --peer-sizes sets of its sizes, every value checked
    before a model is built (a mistake is one line naming the flag, exit status 2)."""
    p = argparse.ArgumentParser(prog="vlcache bench decode", description=first_paragraph(__doc__))
    p.add_argument("--preset", default=None, choices=list(PRESETS), help="default cpu (--quick: quick)")
    p.add_argument("--sizes", default=None, help="prompt lengths in tokens, comma-separated (default: per preset)")
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1)")
    p.add_argument(
        "--policies",
        default=None,
        help='comma-separated, settings after a colon: "h2o,h2o:evict_every=16" (default: every policy)',
    )
    p.add_argument("--budget", type=float, default=0.1, help="keep this share of the prompt in every layer")
    p.add_argument("--new-tokens", type=int, default=36, help="generated per run (default 36: 32 steady steps)")
    p.add_argument(
        "--eager-sizes",
        default=None,
        help='the sizes that also get eager rows (default: every size; "none": none); compiled rows run at every size',
    )
    p.add_argument(
        "--peer-sizes",
        default=None,
        help='the sizes that get the plain Hugging Face static-cache row (default: every size; "none": none)',
    )
    p.add_argument(
        "--warmup",
        choices=["first", "every", "none"],
        default="first",
        help="an untimed run before each row: at the first size a row runs (default; one compile serves every "
        "length), at every size, or never (the steady steps leave the compile and CUDA graph recording out anyway)",
    )
    p.add_argument("--quick", action="store_true", help="the 'quick' preset and two policies unless given (CI)")
    p.add_argument("--out", default="out/decode")
    args = p.parse_args(argv)
    if args.preset is None:  # --quick supplies what was not given; an explicit flag wins
        args.preset = "quick" if args.quick else "cpu"
    if args.policies is None:
        args.policies = "snapkv,h2o" if args.quick else ",".join(n for n in POLICIES if n != "full")
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    if args.new_tokens < 2:
        p.error(f"--new-tokens must be at least 2 (decode steps follow the first token), got {args.new_tokens}")
    args.sizes = token_counts(p, "--sizes", SIZES[args.preset] if args.sizes is None else args.sizes)
    for flag in ("--eager-sizes", "--peer-sizes"):
        key = flag[2:].replace("-", "_")
        text = getattr(args, key)
        chosen = (
            set(args.sizes) if text is None else set() if text.strip() == "none" else set(token_counts(p, flag, text))
        )
        if not chosen <= set(args.sizes):
            p.error(f"--eager-sizes and --peer-sizes must be among --sizes: {flag} {text}, --sizes "
                    f"{','.join(map(str, args.sizes))}")  # fmt: skip
        setattr(args, key, chosen)
    try:  # a bad budget is the user's error, said before anything is built
        make_policy("snapkv", budget=args.budget)
    except ValueError as e:
        p.error(f"--budget: {e}")
    args.policies = ["full"] + [x.strip() for x in args.policies.split(",") if x.strip() and x.strip() != "full"]
    for name in args.policies:  # a bad name or setting too
        try:
            make(name, args.budget)
        except (ValueError, TypeError, KeyError) as e:
            p.error(f"--policies {name!r}: {e}")
    return args


def make(name: str, budget: float):
    """A policy from "name" or "name:setting=value;...", at `budget` (`full` takes none)."""
    base, _, extra = name.partition(":")
    settings = parse_settings([x for x in extra.split(";") if x])
    return make_policy(base, **settings) if base == "full" else make_policy(base, budget=budget, **settings)


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    device = preset["device"]
    sizes, eager_sizes, peer_sizes = args.sizes, args.eager_sizes, args.peer_sizes
    model, params, weight_bytes, where, model_words, bandwidth = bench_model(args.preset, preset, max(sizes))
    print(f"{where}; model: {model_words}; budget {args.budget}; batch {args.batch}; {args.new_tokens} new tokens")
    names = args.policies
    warmed = set()

    def timed(inputs, name, compiled, **kw):
        kw.update(min_new_tokens=args.new_tokens, compile=compiled)
        policy = make(name, args.budget) if name is not None else None
        key = (name, compiled, tuple(kw.items()))
        if args.warmup == "every" or (args.warmup == "first" and key not in warmed):
            timed_run.run(model, None, inputs, policy, args.new_tokens, **kw)  # warm-up (and compile)
            policy = make(name, args.budget) if name is not None else None
        warmed.add(key)
        base = None
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()  # weights, inputs and whatever an earlier row still holds
            torch.cuda.reset_peak_memory_stats()
        # the collector off while timed: a compile inside the run (--warmup none) leaves garbage whose collection
        # stalled one steady step by 0.2 s on the CPU
        gc.collect()
        gc.disable()
        try:
            with GraphCalls(model) if device == "cuda" and compiled else nullcontext() as calls:
                r = timed_run.run(model, None, inputs, policy, args.new_tokens, **kw)
        finally:
            gc.enable()
        r.peak_bytes = torch.cuda.max_memory_allocated() if device == "cuda" else None
        # what this run needs on a GPU holding only the model: its own peak above the base, plus the weights (an
        # earlier row's cache still alive while this one runs must not count against it)
        r.run_peak_bytes = r.peak_bytes - base + weight_bytes if base is not None else None
        r.graphs = calls.steady(SKIP, len(r.step_s)) if calls is not None else None
        # how many decode steps ran through the compiled step (a compiled row that silently ran eagerly has none)
        decode = getattr(r.session, "decode", None)
        r.compiled_steps = decode.steps if compiled and decode is not None and decode.capture else None
        r.session = None  # the session holds the run's cache (the full cache's is 15 GB at batch 8, 32K): free it
        return r

    def attempt(inputs, name, compiled):
        """The run, or why it failed in one line (out of memory is a result here: the batch that does not fit)."""
        try:
            return timed(inputs, name, compiled)
        except Exception as e:
            if device == "cuda":
                torch.cuda.empty_cache()
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            print(f"{name or 'plain Hugging Face'} ({'compiled' if compiled else 'eager'}) failed: {why}")
            return why

    rows = []
    out = Path(args.out)
    setup = dict(device=where, preset=args.preset, parameters=params, weight_bytes=weight_bytes,
                 copy_bandwidth=bandwidth, budget=args.budget, batch=args.batch, new_tokens=args.new_tokens,
                 steady_after=SKIP)  # fmt: skip

    def save():  # after every row: a run stopped at its time limit keeps what it measured
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")

    for n in sizes:
        one = prompt(model, n, device)
        inputs = {
            k: torch.cat([v] * args.batch) if k != "image_grid_thw" else v.repeat(args.batch, 1) for k, v in one.items()
        }
        real_n = inputs["input_ids"].shape[1]
        if any(r["n"] == real_n for r in rows):  # prompts come in whole images: two sizes can give one prompt
            print(f"\n{n} tokens: the same {real_n}-token prompt as a size before it, not run again")
            continue
        print(f"{real_n} tokens")
        full = {}
        for name in names:
            eager = attempt(inputs, name, False) if n in eager_sizes else None
            for mode, r in (("eager", eager), ("compiled", attempt(inputs, name, True))):
                if r is None:
                    continue
                row = dict(n=real_n, batch=args.batch, policy=name, mode=mode)
                if isinstance(r, str):  # it failed (said in one line): the other rows still run
                    rows.append(dict(row, error=r))
                    save()
                    continue
                eager = eager if isinstance(eager, timed_run.RunResult) else None
                ms = row["decode_ms"] = steady_ms(r)
                if name == "full":  # the first row
                    full[mode] = ms
                vs_full = ms / full[mode] if mode in full else None
                row.update(decode_ms_median=r.decode_ms_median, vs_full=vs_full)
                row.update(kv_bytes=r.prefill_stats.kv_bytes if r.prefill_stats else None)
                row["same_tokens"] = r.tokens == eager.tokens if eager is not None else None
                if mode == "compiled":
                    row["compiled_steps"] = r.compiled_steps
                    row["speedup"] = steady_ms(eager) / ms if eager is not None else None
                    if device == "cuda":  # every steady step replayed a graph (TORCH_LOGS=perf_hints: why not)
                        row["cuda_graphs"], row["graph_steps"] = all_replayed(r.graphs), r.graphs
                if r.peak_bytes is not None:
                    row["peak_bytes"], row["run_peak_bytes"] = r.peak_bytes, r.run_peak_bytes
                if bandwidth and row["kv_bytes"]:
                    row["bound_ms"] = (weight_bytes + row["kv_bytes"]) / bandwidth * 1000
                    row["bandwidth_fraction"] = row["bound_ms"] / ms
                rows.append(row)
                save()
                print(f"  {name} {mode}: {ms:.2f} ms/token"
                      + (f", {row['bandwidth_fraction']:.2f} of the bound" if "bandwidth_fraction" in row else ""))  # fmt: skip
            del eager, r  # neither result's cache may sit in memory while the next policy runs
        # plain Hugging Face, then the peer, after the policies: where a time limit stops the run (a GPU session's
        # minutes), the rows the targets need are already kept
        plain = attempt(inputs, None, False)
        plain = steady_ms(plain) if isinstance(plain, timed_run.RunResult) else None
        print(f"  plain Hugging Face: {plain:.2f} ms/token" if plain else "  plain Hugging Face: failed")
        peer = hf_static(timed, inputs) if n in peer_sizes else None
        for row in rows:
            if row["n"] == real_n and "error" not in row:
                row.update(plain_ms=plain, vs_plain=row["decode_ms"] / plain if plain else None, hf_static_ms=peer)
                if peer:
                    row["vs_hf_static"] = row["decode_ms"] / peer
        save()
        print_block(rows, real_n, plain, peer)
        plot(rows, out / "decode.png", where)
    print(f"wrote {out / 'decode.json'} and {out / 'decode.png'}")
    return 0


def steady_ms(r) -> float:
    """A run's decode ms/token: the mean step after the first SKIP (a compile, a CUDA graph's warm-up and recording
    fall in those when a row runs without a warm-up). The mean, not the median: an eviction every k steps is a slow
    step the median would leave out; over a multiple of k steps the mean counts it once per k."""
    steps = r.step_s[SKIP:] or r.step_s
    return 1000 * sum(steps) / len(steps)


def hf_static(timed, inputs) -> float | None:
    """Plain Hugging Face's decode ms/token with its own static cache (compiled by transformers on CUDA), or None
    where this model and transformers cannot run it (said in one line)."""
    try:
        return steady_ms(timed(inputs, None, False, cache_implementation="static"))
    except Exception as e:  # a peer row that cannot run must not cost the benchmark's own rows
        print(f"plain Hugging Face with its static cache could not run here: {type(e).__name__}: {e}")
        return None


def print_block(rows, n, plain, peer=None):
    with_peer = (
        f"; with its static cache{' (compiled)' if torch.cuda.is_available() else ''} {peer:.2f}" if peer else ""
    )
    plain = f"{plain:.2f} ms/token" if plain else "failed"
    print(f"\nprompt {n} tokens; plain Hugging Face {plain}{with_peer}")
    failed = [r for r in rows if r["n"] == n and "error" in r]
    here = [r for r in rows if r["n"] == n and "error" not in r]
    w = max([13, *(len(r["policy"]) for r in here)])  # every row may have failed
    print(
        f"{'policy':<{w}} {'eager ms/t':>11} {'x plain':>8} {'x full':>7} {'compiled':>9} {'x plain':>8} "
        f"{'x full':>7} {'speedup':>8} {'same':>5} {'bound ms':>9} {'bw frac':>8} {'peak GiB':>9} {'graphs':>7}"
    )

    def cell(r, key, width, fmt):
        value = r.get(key) if r else None
        return f"{value:>{width}{fmt}}" if value is not None else f"{'-':>{width}}"

    for name in dict.fromkeys(r["policy"] for r in here):
        e = next((r for r in here if r["policy"] == name and r["mode"] == "eager"), None)
        c = next((r for r in here if r["policy"] == name and r["mode"] == "compiled"), None)
        if c is None:
            print(f"{name:<{w}} {cell(e, 'decode_ms', 11, '.2f')}   (compiled: failed)")
            continue
        same = "-" if c["same_tokens"] is None else str(c["same_tokens"])[0]
        speedup = f"{c['speedup']:>7.2f}x" if c.get("speedup") else f"{'-':>8}"
        held = c.get("run_peak_bytes") or c.get("peak_bytes")
        peak = f"{held / 2**30:>9.1f}" if held else f"{'-':>9}"
        steps = c.get("graph_steps")  # steady steps that replayed a CUDA graph, of all steady steps
        replays = f"{steps['replayed']}/{steps['steps']}" if steps else "-"
        graphs = f"{replays:>7}"
        print(
            f"{name:<{w}} {cell(e, 'decode_ms', 11, '.2f')} {cell(e, 'vs_plain', 8, '.2f')} {cell(e, 'vs_full', 7, '.2f')} "
            f"{c['decode_ms']:>9.2f} {cell(c, 'vs_plain', 8, '.2f')} {cell(c, 'vs_full', 7, '.2f')} {speedup} {same:>5} "
            f"{cell(c, 'bound_ms', 9, '.2f')} {cell(c, 'bandwidth_fraction', 8, '.2f')} {peak} {graphs}"
        )
    for r in failed:
        print(f"{r['policy']:<{w}} {r['mode']} failed: {r['error']}")


def plot(rows, path, title):
    rows = [r for r in rows if "error" not in r]
    sizes = sorted({r["n"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    with figure_row(path, 2, (11, 3.6), title) as axes:
        for i, name in enumerate(policies):
            style = series_style(i)
            for ax, mode in zip(axes, ("eager", "compiled")):
                pts = [r for r in rows if r["policy"] == name and r["mode"] == mode]
                ax.plot([r["n"] for r in pts], [r["decode_ms"] for r in pts], label=name, **style)
                bound = [r for r in pts if "bound_ms" in r]
                if mode == "compiled" and bound:  # on a GPU: the bandwidth bound beside the step, dotted
                    ax.plot([r["n"] for r in bound], [r["bound_ms"] for r in bound], ":", color=style.get("color"))
        for ax, mode in zip(axes, ("eager", "compiled")):
            ax.set_xscale("log", base=2) if len(sizes) > 1 else None
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel(f"decode, {mode} (ms / token)")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)


if __name__ == "__main__":
    sys.exit(main())
