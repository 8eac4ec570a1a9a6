"""Quality benchmark: accuracy vs vision budget for every policy on every task, with floors and ceilings, and
fidelity (token agreement and KL against the full cache).

    vlcache bench quality                     # the embedded model, 8-frame held-out videos and 16-frame ones
    vlcache bench quality --model qwen        # the Qwen2-VL embedded model (merged patches, M-RoPE)
    vlcache bench quality --quick             # a tiny grid (what CI runs)
    vlcache bench quality --policies "vlcache,vlcache:prune_at=2,full:temporal_merge=0.9" --tasks static

Budgets are vision budgets (`vision_budget`: a share of the image tokens; all text kept, markers and question
protected). A policy may carry settings after a colon, ";" between them (`vlcache:prune_at=2`); rows with
temporal merging also print the share of vision tokens it removed before the model. Held-out examples come
from seeds no training batch used. Prints tables, writes <out>/quality.json and <out>/quality.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ...policies import POLICIES, make_policy, parse_settings
from ..evaluation.embedded_model import batch_inputs, load_embedded
from ..evaluation.quality import accuracy, fidelity, merged_share
from ..evaluation.tasks import EVAL_TASKS, chance, make_example
from . import comma_items, fill_flags, first_paragraph
from .figure import figure_row, series_style

BUDGETS = (0.01, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)
HELD_OUT = 2 * 10**6  # training draws from seed 0; evaluation streams start here


# the new prefill settings next to the methods they modify (prune_at=2 of the embedded models' 4 layers)
EXTRA_ROWS = ("vlcache:prune_at=2", "snapkv:prune_at=2", "vlcache:temporal_merge=0.9", "full:temporal_merge=0.9")


def policy_for(spec: str, budget: float):
    """A policy from "name" or "name:setting=value;setting=value" at a vision budget (`full` takes none)."""
    name, _, extra = spec.partition(":")
    settings = parse_settings([x for x in extra.split(";") if x])
    return make_policy(name, **settings) if name == "full" else make_policy(name, vision_budget=budget, **settings)


# --quick: the values of the flags it was not given (what CI runs); the rest stay the user's, checked the same way
QUICK = dict(policies="snapkv,lookm", tasks="needle", budgets="0.1,1.0", frames="8", n=4)
DEFAULTS = dict(
    policies=",".join([*(n for n in POLICIES if n != "full"), *EXTRA_ROWS]),
    tasks=",".join(EVAL_TASKS),
    budgets=",".join(map(str, BUDGETS)),
    frames="8,16",
    n=100,
)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with --policies, --tasks, --budgets and --frames as lists, every value checked before a
    model loads (a mistake is one line naming the flag, exit status 2)."""
    p = argparse.ArgumentParser(prog="vlcache bench quality", description=first_paragraph(__doc__))
    p.add_argument(
        "--model",
        default=None,
        help="a trained embedded-model directory, or a shipped one: llava (the default) or qwen (the Qwen2-VL)",
    )
    p.add_argument("--policies", default=None, help='comma-separated, settings after a colon: "vlcache:prune_at=2" '
                   "(default: every policy and " + ", ".join(EXTRA_ROWS) + ")")  # fmt: skip
    p.add_argument("--tasks", default=None, help=f"comma-separated, of {', '.join(EVAL_TASKS)} (default: all)")
    p.add_argument("--budgets", default=None, help=f"vision budgets in (0, 1] (default {DEFAULTS['budgets']})")
    p.add_argument("--frames", default=None, help="video lengths (default 8,16; training saw 1 to 10 frames)")
    p.add_argument("--n", type=int, default=None, help="held-out examples per cell (default 100)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a tiny grid for CI: 2 policies, 2 budgets, 1 task, 8 frames, n=4, for the flags not given",
    )
    p.add_argument("--out", default="out/quality")
    args = p.parse_args(argv)
    fill_flags(args, QUICK, DEFAULTS)  # an explicit flag wins over --quick

    if args.n < 1:
        p.error(f"--n must be at least 1, got {args.n}")
    args.tasks = comma_items(p, "--tasks", args.tasks)
    for task in args.tasks:
        if task not in EVAL_TASKS:
            p.error(f"--tasks: no task {task!r}; choose from {', '.join(EVAL_TASKS)}")
    budgets = comma_items(p, "--budgets", args.budgets)
    try:
        args.budgets = [float(x) for x in budgets]
    except ValueError:
        args.budgets = []
    if len(args.budgets) != len(budgets) or not all(0 < b <= 1 for b in args.budgets):  # also NaN
        p.error(f"--budgets takes comma-separated shares of the vision tokens in (0, 1], got {','.join(budgets)!r}")
    frames = comma_items(p, "--frames", args.frames)
    if not all(x.isdigit() and int(x) >= 1 for x in frames):
        p.error(f"--frames takes comma-separated frame counts of at least 1, got {','.join(frames)!r}")
    args.frames = [int(x) for x in frames]
    if not any(not skipped(t, f) for t in args.tasks for f in args.frames):
        p.error(f"nothing to run: --tasks {','.join(args.tasks)} answer with one digit (10 frames at most), "
                f"--frames {','.join(frames)}")  # fmt: skip
    args.policies = comma_items(p, "--policies", args.policies)
    for spec in args.policies:  # a bad name, setting or budget is said before the model loads
        try:
            for b in args.budgets:
                policy_for(spec, b)
        except (ValueError, TypeError, KeyError) as e:
            p.error(f"--policies {spec!r}: {e}")
    return args


def skipped(task: str, frames: int) -> bool:
    """Where and lookup answer with one digit: no cell past 10 frames."""
    return task in ("where", "lookup") and frames > 10


def main(argv=None) -> int:
    args = parse_args(argv)
    model, processor = load_embedded(args.model)
    policies, tasks, budgets, frame_counts = args.policies, args.tasks, args.budgets, args.frames
    started = time.time()
    results = []
    for frames in frame_counts:
        for task in tasks:
            if skipped(task, frames):
                continue
            seed = HELD_OUT + 1000 * frames + EVAL_TASKS.index(task)
            ref = {k: accuracy(model, processor, task, frames, k, args.n, seed) for k in ("floor", "ceiling")}
            ref["full"] = accuracy(model, processor, task, frames, None, args.n, seed)
            row = {"task": task, "frames": frames, "chance": chance(task, frames), **ref, "policies": {}, "merged": {}}
            for name in policies:
                row["policies"][name] = [
                    accuracy(model, processor, task, frames, policy_for(name, b), args.n, seed) for b in budgets
                ]
                if "temporal_merge" in name:
                    row["merged"][name] = merged_share(model, processor, task, frames, policy_for(name, 1.0), 50, seed)
            results.append(row)
            print_table(row, budgets)
    fid = fidelity_table(model, processor, policies, budgets, frame_counts[0], n=min(args.n, 50))
    elapsed = time.time() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(
        json.dumps({"budgets": budgets, "accuracy": results, "fidelity": fid, "seconds": elapsed}, indent=2) + "\n"
    )
    plot(results, budgets, out / "quality.png")
    print(f"\n{elapsed:.0f}s; wrote {out / 'quality.json'} and {out / 'quality.png'}")
    return 0


def print_table(row, budgets):
    print(
        f"\n{row['task']} @ {row['frames']} frames: full {row['full']:.2f}, floor (no vision) {row['floor']:.2f}, "
        f"ceiling (answer tokens only) {row['ceiling']:.2f}, chance {row['chance']:.2f}"
    )
    w = max(14, *(len(name) + 1 for name in row["policies"]))
    print(f"{'vision budget':<{w}}" + "".join(f"{100 * b:>7.0f}%" for b in budgets))
    for name, accs in row["policies"].items():
        merged = row.get("merged", {}).get(name)
        note = f"   ({100 * merged:.0f}% of vision tokens merged before the model)" if merged is not None else ""
        print(f"{name:<{w}}" + "".join(f"{a:>8.2f}" for a in accs) + note)


def fidelity_table(model, processor, policies, budgets, frames, n):
    """Agreement with the full cache and KL, on the describe task (a multi-token answer) at `frames` frames."""
    rng = np.random.default_rng(HELD_OUT + 7)
    examples = [make_example("describe", frames, rng) for _ in range(n)]
    inputs = batch_inputs(processor, examples)
    steps = frames + 1
    reference = None
    table = {}
    print(f"\nfidelity vs the full cache (describe, {frames} frames, {steps} tokens): agreement / KL")
    w = max(14, *(len(name) + 1 for name in policies))
    print(f"{'vision budget':<{w}}" + "".join(f"{100 * b:>14.0f}%" for b in budgets))
    for name in policies:
        cells = []
        for b in budgets:
            f = fidelity(model, inputs, policy_for(name, b), steps, reference)
            reference = f.pop("reference")
            cells.append(f)
        table[name] = cells
        print(f"{name:<{w}}" + "".join(f"{c['agreement']:>7.2f} /{c['kl']:>6.3f}" for c in cells))
    return table


def plot(results, budgets, path):
    with figure_row(path, len(results), (3.6 * len(results), 3.4)) as axes:
        for ax, row in zip(axes, results):
            for i, (name, accs) in enumerate(row["policies"].items()):
                ax.plot([100 * b for b in budgets], accs, label=name, **series_style(i))
            ax.axhline(row["full"], color="k", lw=1, label="full cache")
            ax.axhline(row["ceiling"], color="g", ls=":", lw=1, label="ceiling")
            ax.axhline(row["floor"], color="r", ls="--", lw=1, label="floor")
            ax.set_xscale("log")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"{row['task']}, {row['frames']} frames")
            ax.set_xlabel("vision tokens kept (%)")
            ax.set_ylabel("accuracy")
            ax.grid(alpha=0.3)
        axes[-1].legend(fontsize=7, loc="lower right")


if __name__ == "__main__":
    sys.exit(main())
