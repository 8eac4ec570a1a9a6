"""Issue 19's GPU targets against what `scripts/gpu_check.sh` measured: one line per target, met or missed, with the
numbers behind it.

    python scripts/decode_targets.py OUT [OUT2 ...]   # OUT*/decode, decode_batch8, decode_8k: decode.json each
    python scripts/decode_targets.py OUT OUT2 --plots docs/results/decode_h200   # and each run's plot drawn there

The device returns at most 8 files, so the GPU script sends the JSON back without its plots; `--plots` draws them
here from it (decode.png per run, kernels.png for the decode kernel's benchmark).

Targets (Qwen2-VL-7B text dimensions, bf16, the largest prompt measured, 10% kept): compiled compressed decode at
>= 70% of the bandwidth bound at batch 1; its step <= 0.75x the compiled full cache's; H2O's and CAKE's <= 1.2x
SnapKV's; batch 8 at 32K fits in a memory where the full cache's batch 8 does not.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows_of(outs: list[Path], run: str) -> list[dict]:
    """The rows of `run` (a folder name) from the first of `outs` that has it (the GPU script's calls each
    return their own folder)."""
    for out in outs:
        path = out / run / "decode.json"
        if path.exists():
            return json.loads(path.read_text())["rows"]
    return []


def pick(rows, policy, mode="compiled", n=None):
    for r in rows:
        if r["policy"] == policy and r["mode"] == mode and (n is None or r["n"] == n) and "error" not in r:
            return r
    return None


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "met" if ok else "MISSED"


def _graph_steps(r) -> str:
    s = r.get("graph_steps")
    return f" ({s['replayed']} of {s['steps']} steady steps replayed, {s['slow']} recorded or eager)" if s else ""


def targets(outs: list[Path]) -> list[str]:
    lines = []
    one = rows_of(outs, "decode")
    n = max((r["n"] for r in one), default=None)
    full, snap = pick(one, "full", n=n), pick(one, "snapkv", n=n)
    frac = snap.get("bandwidth_fraction") if snap else None
    lines.append(f"{verdict(None if frac is None else frac >= 0.70)}: SnapKV compiled at {n} tokens reaches "
                 f"{_f(frac)} of the bound ({_f(snap and snap.get('bound_ms'))} ms bound, "
                 f"{_f(snap and snap['decode_ms'])} ms/token; target >= 0.70)")  # fmt: skip
    ratio = snap["decode_ms"] / full["decode_ms"] if snap and full else None
    lines.append(f"{verdict(None if ratio is None else ratio <= 0.75)}: SnapKV's compiled step {_f(ratio)}x the full "
                 f"cache's ({_f(full and full['decode_ms'])} ms; target <= 0.75x)")  # fmt: skip
    for name in ("h2o", "cake"):
        row = next((r for r in one if r["n"] == n and r["mode"] == "compiled" and r["policy"].split(":")[0] == name
                    and "error" not in r), None)  # fmt: skip
        ratio = row["decode_ms"] / snap["decode_ms"] if row and snap else None
        label = row["policy"] if row else name
        lines.append(f"{verdict(None if ratio is None else ratio <= 1.2)}: {label} compiled {_f(ratio)}x SnapKV's step "
                     f"({_f(row and row['decode_ms'])} ms; target <= 1.2x)")  # fmt: skip
    small = rows_of(outs, "decode_8k")
    every = one + small
    ksnap = pick(small, "snapkv")
    peer = ksnap.get("hf_static_ms") if ksnap else None
    if peer:
        lines.append(f"peer at {ksnap['n']} tokens: plain Hugging Face, static cache, compiled: {peer:.2f} ms/token; "
                     f"SnapKV compiled {ksnap['decode_ms'] / peer:.2f}x of it")  # fmt: skip
    faster = [f"{r['policy']} {r['speedup']:.2f}x" for r in small if r["mode"] == "compiled" and r.get("speedup")]
    if faster:
        lines.append(f"compiled against eager at {small[0]['n']} tokens: " + ", ".join(faster))
    ran = [r for r in every if r["mode"] == "compiled" and "compiled_steps" in r]
    if ran:  # a compiled row whose steps did not go through the compiled step measured eager decoding
        eager = [f"{r['policy']}@{r['n']}" for r in ran if not r["compiled_steps"]]
        lines.append("compiled step: " + ("every compiled row's decode steps ran through it" if not eager else
                     "NOT run by " + ", ".join(eager)))  # fmt: skip
    graphs = [r for r in every if r["mode"] == "compiled" and "cuda_graphs" in r]
    if graphs:
        missed = [f"{r['policy']}@{r['n']}{_graph_steps(r)}" for r in graphs if r["cuda_graphs"] is False]
        unknown = [f"{r['policy']}@{r['n']}" for r in graphs if r["cuda_graphs"] is None]
        lines.append("CUDA graphs: " + ("every steady step of every compiled row replayed one" if not missed else
                     "not replayed in " + ", ".join(missed)) + ("; not known for " + ", ".join(unknown) if unknown else ""))  # fmt: skip
    same = [r for r in every if r["mode"] == "compiled" and r.get("same_tokens") is not None]
    if same:
        lines.append(f"compiled tokens equal to eager: {sum(r['same_tokens'] for r in same)} of {len(same)} rows "
                     "(random weights: a different attention kernel may flip a near tie)")  # fmt: skip
    eight = rows_of(outs, "decode_batch8")
    bfull, bsnap = pick(eight, "full"), pick(eight, "snapkv")
    failed = [r for r in eight if "error" in r]
    if bfull and bsnap and _peak(bfull) and _peak(bsnap):
        a, b = _peak(bsnap) / 2**30, _peak(bfull) / 2**30
        lines.append(f"{verdict(a < b)}: batch 8 at {bsnap['n']} tokens: SnapKV peaks at {a:.1f} GiB, the full cache at "
                     f"{b:.1f} GiB: a memory between the two holds SnapKV's batch and not the full cache's")  # fmt: skip
    elif bsnap and any(r["policy"] == "full" for r in failed):
        lines.append(f"met: batch 8: the full cache failed ({failed[0]['error']}), SnapKV ran")
    else:
        lines.append("not measured: batch 8 at 32K (decode_batch8/decode.json has no full and SnapKV pair)")
    return lines


def _peak(row) -> int | None:
    """The memory a row's run needs: the weights plus its own peak above what was allocated before it (rows
    written before that figure existed: the absolute peak)."""
    return row.get("run_peak_bytes") or row.get("peak_bytes")


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"


RUNS = ("decode", "decode_batch8", "decode_8k")


def plots(outs: list[Path], where: Path) -> list[Path]:
    """Each run's plot drawn from its JSON into `where` (<run>.png; kernels_decode.png): the paths written."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vlcache.apps.bench import decode, kernels

    where.mkdir(parents=True, exist_ok=True)
    written = []
    for out in outs:
        for run in RUNS + ("kernels_decode",):
            name = "kernels.json" if run == "kernels_decode" else "decode.json"
            path = out / run / name
            if path.exists() and (where / f"{run}.png") not in written:
                data = json.loads(path.read_text())
                draw = kernels.plot if run == "kernels_decode" else decode.plot
                draw(data["rows"], where / f"{run}.png", data.get("setup", {}).get("device", run))
                written.append(where / f"{run}.png")
    return written


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    where = None
    if "--plots" in argv:
        i = argv.index("--plots")
        if i + 1 >= len(argv):
            print("--plots takes a folder", file=sys.stderr)
            return 2
        where = Path(argv[i + 1])
        del argv[i : i + 2]
    if not argv:
        print(__doc__.splitlines()[3].strip(), file=sys.stderr)
        return 2
    outs = [Path(a) for a in argv]
    for line in targets(outs):
        print(line)
    for path in plots(outs, where) if where is not None else []:
        print(f"drew {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
