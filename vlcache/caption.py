"""Batch video captioning with a compressed KV cache (`vlcache caption`, `python -m vlcache.caption`).

    vlcache caption                                  # the bundled sample videos, full cache vs VL-Cache at 25% of the vision tokens, a summary table
    vlcache caption videos/ list.txt a.mp4 -o captions.jsonl --policy snapkv --budget 0.1
    accelerate launch --num_processes 2 -m vlcache.caption videos/ -o captions.jsonl   # sharded over processes

One JSON record per video, appended and flushed as soon as it is done, so an interrupted run loses nothing and a
rerun skips what is done (--no-resume to redo everything). A video that cannot be read gets an error record with
the reason and the run goes on; the exit status is 1 if any video failed. Under `accelerate launch` every process
takes its share of the inputs and writes its own shard; the first process merges them at the end, one record per
video.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .policies import Full
from .policies.base import BUDGET_FIELDS
from .video import VideoError, collect_inputs, read_frames, write_video

SAMPLE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlcache" / "samples"


def ensure_samples(folder: Path = SAMPLE_DIR, count: int = 4, frames: int = 8) -> list[Path]:
    """Procedurally generated sample videos (written on first use): the embedded model's synthetic world, frames
    upscaled 8x (nearest) to 128 x 128, so that decoders and browsers handle them and the pixel the embedded
    processor samples from each 8 x 8 block lies away from the codec's colour interpolation at block edges."""
    import numpy as np
    from PIL import Image

    from .evaluation.tasks import SIZE, make_example

    folder = Path(folder)
    rng = np.random.default_rng(20261122)
    paths = []
    for i in range(count):
        ex = make_example("describe", frames, rng)
        path = folder / f"sample{i}.mp4"
        if not path.exists():
            write_video(path, [f.resize((8 * SIZE, 8 * SIZE), Image.NEAREST) for f in ex.frames])
        paths.append(path)
    return paths


def read_done(out: Path) -> set[str]:
    """Paths with a successful record in the output or any of its shards."""
    done = set()
    for f in [out, *out.parent.glob(out.name + ".shard*")]:
        for rec in _records(f):
            if rec.get("status") == "ok":
                done.add(rec["path"])
    return done


def _records(path: Path):
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption


def merge(out: Path) -> list[dict]:
    """Fold the shards into `out`: one record per path (the last success, else the last error)."""
    files = [out, *sorted(out.parent.glob(out.name + ".shard*"))]
    best: dict[str, dict] = {}
    for f in files:
        for rec in _records(f):
            prev = best.get(rec["path"])
            if prev is None or rec.get("status") == "ok" or prev.get("status") != "ok":
                best[rec["path"]] = rec
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in best.values()))
    tmp.replace(out)
    for f in files[1:]:
        f.unlink()
    return list(best.values())


def _policy_label(policy) -> dict:
    amounts = {k: getattr(policy, k) for k in BUDGET_FIELDS if getattr(policy, k) is not None}
    changed = policy.changed_settings()
    return {"policy": policy.name, **amounts, **({"settings": changed} if changed else {})}


def caption_batch(model, processor, items, policy, args, compare: bool) -> list[dict]:
    """Caption equally long frame lists in one generate call; one record per item."""
    from . import pipeline

    inputs = pipeline.frames_inputs(
        processor, [fr for _, fr in items], args.question, device=next(model.parameters()).device
    )
    max_new = args.max_new_tokens or (len(items[0][1]) + 1 if pipeline.is_embedded(model) else 64)
    run = pipeline.run(model, processor, inputs, policy, max_new)
    full = pipeline.run(model, processor, inputs, Full(), max_new) if compare else None
    records = []
    for b, (path, frames) in enumerate(items):
        st = run.row_stats[b]
        rec = {
            "path": str(path),
            "status": "ok",
            "caption": run.texts[b].strip(),
            "frames": len(frames),
            "tokens_before": st.prompt_tokens,
            "tokens_after": round(st.kept(), 1),
            "kv_bytes_kept": st.kv_bytes,
            "kv_bytes_saved": st.kv_bytes_saved,
            "prefill_s": round(run.prefill_s, 4),
            "decode_s": round(run.decode_s, 4),
            "batch": len(items),
            **_policy_label(policy),
            "model": args.model,
        }
        if full is not None:
            rec["caption_full"] = full.texts[b].strip()
            rec["agrees_with_full"] = rec["caption"] == rec["caption_full"]
        records.append(rec)
    return records


def main(argv=None) -> int:
    from .cli import add_budget_args, policy_from_args

    p = argparse.ArgumentParser(prog="vlcache caption", description=__doc__.splitlines()[0])
    p.add_argument(
        "inputs", nargs="*", help="videos, images, folders, or .txt files listing paths (default: bundled samples)"
    )
    p.add_argument("-o", "--out", default="captions.jsonl")
    p.add_argument("--model", default="embedded", help="hub id or local path (default: the embedded model)")
    p.add_argument("--policy", default="vlcache")
    add_budget_args(p, default="--vision-budget 0.25")
    p.add_argument("--frames", type=int, default=8, help="frames spread uniformly over each video")
    p.add_argument("--fps", type=float, default=None, help="sample at this rate instead of --frames")
    p.add_argument("--max-frames", type=int, default=64, help="cap on frames per video")
    p.add_argument("--batch", type=int, default=1, help="videos per generate call")
    p.add_argument("--question", default=None, help="the prompt (default: the model's caption question)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--compare", action="store_true", help="also caption with the full cache (default with the samples)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="redo videos already in the output")
    args = p.parse_args(argv)
    if args.batch < 1 or args.frames < 1 or args.max_frames < 1:
        raise ValueError("--batch, --frames and --max-frames must be >= 1")

    from accelerate import PartialState
    from tqdm import tqdm

    from . import pipeline

    state = PartialState()
    rank, world = state.process_index, state.num_processes
    policy = policy_from_args(args.policy, args)  # bad settings fail before any work
    samples = not args.inputs
    paths = ensure_samples() if samples else collect_inputs(args.inputs)
    compare = args.compare or samples
    if not paths:
        raise ValueError("no inputs: give videos, images, folders or .txt lists")
    model, processor = pipeline.load(args.model)
    args.question = args.question or pipeline.default_question(model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out) if args.resume else set()
    mine = [q for q in paths[rank::world] if str(q) not in done]
    skipped = len(paths[rank::world]) - len(mine)
    sink_path = out if world == 1 else out.with_name(f"{out.name}.shard{rank}")
    failed = 0
    started = time.time()
    with (
        open(sink_path, "a") as sink,
        tqdm(
            total=len(mine),
            desc=f"caption[{rank}]" if world > 1 else "caption",
            unit="video",
            disable=rank > 0 and not sys.stderr.isatty(),
        ) as bar,
    ):

        def emit(rec):
            sink.write(json.dumps(rec) + "\n")
            sink.flush()

        pending: list[tuple[Path, list]] = []

        def flush_pending():
            if not pending:
                return
            for rec in caption_batch(model, processor, pending, policy, args, compare):
                emit(rec)
            bar.update(len(pending))
            pending.clear()

        for path in mine:
            try:
                frames = read_frames(
                    path, frames=None if args.fps else args.frames, target_fps=args.fps, cap=args.max_frames
                )
            except VideoError as e:
                emit(
                    {
                        "path": str(path),
                        "status": "error",
                        "error": str(e),
                        **_policy_label(policy),
                        "model": args.model,
                    }
                )
                failed += 1
                bar.update(1)
                continue
            if pending and len(pending[0][1]) != len(frames):
                flush_pending()  # a batch holds videos of one length
            pending.append((path, frames))
            if len(pending) == args.batch:
                flush_pending()
        flush_pending()
    state.wait_for_everyone()
    if rank == 0:
        records = merge(out)
        these = {str(q) for q in paths}
        mine_all = [r for r in records if r["path"] in these]
        total_failed = sum(r["status"] != "ok" for r in mine_all)
        print_summary(mine_all, out, time.time() - started, skipped, compare)
        return 1 if total_failed else 0
    return 1 if failed else 0


def print_summary(records, out, seconds, skipped, compare):
    ok = [r for r in records if r["status"] == "ok"]
    bad = [r for r in records if r["status"] != "ok"]
    if ok:
        r = ok[0]
        amounts = ", ".join(
            [f"{k}={r[k]}" for k in BUDGET_FIELDS if k in r] + [f"{k}={v}" for k, v in r.get("settings", {}).items()]
        )
        print(f"\nmodel {r['model']}; policy {r['policy']}({amounts})" + (" against the full cache" if compare else ""))
    print(
        f"\n{'video':<28} {'tokens':>7} {'kept':>7} {'KV saved':>10}  caption" + ("  |  full cache" if compare else "")
    )
    for r in ok:
        line = f"{Path(r['path']).name[:28]:<28} {r['tokens_before']:>7} {r['tokens_after']:>7.0f} {r['kv_bytes_saved']:>10,}  {r['caption']!r}"
        if compare and "caption_full" in r:
            line += f"  |  {r['caption_full']!r}{'' if r['agrees_with_full'] else '  (differs)'}"
        print(line)
    for r in bad:
        print(f"{Path(r['path']).name[:28]:<28} error: {r['error']}")
    total_saved = sum(r["kv_bytes_saved"] for r in ok)
    agree = sum(r.get("agrees_with_full", False) for r in ok)
    print(
        f"\ndone {len(ok)}, skipped {skipped} (already in {out}), failed {len(bad)}; KV saved {total_saved:,} bytes"
        + (f"; captions equal to the full cache's: {agree}/{len(ok)}" if compare and ok else "")
        + f"; {seconds:.1f}s"
    )


if __name__ == "__main__":
    from .cli import run_main

    sys.exit(run_main(main))
