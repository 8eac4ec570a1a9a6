"""Batch video captioning with a compressed KV cache (`vlcache caption`, `python -m vlcache.apps.caption`).

    vlcache caption                                  # the sample videos (generated), full cache vs VL-Cache at 25% of the vision tokens, a summary table
    vlcache caption videos/ list.txt a.mp4 -o captions.jsonl --policy snapkv --budget 0.1
    vlcache caption videos/ --kv-memory 8GB          # batches as large as 8 GB of compressed KV cache allows
    torchrun --nproc_per_node 2 -m vlcache.apps.caption videos/ -o captions.jsonl   # sharded (or accelerate launch)

One JSON record per video and configuration, appended and made durable as soon as it is done (see record_file.py:
one run holds the output's lock, a torn last line is set aside, a full disk stops the run without damaging the
file), so an interrupted run loses nothing and a rerun with the same configuration (model weights, policy and its
settings, frames, question, ...) skips what is done (--no-resume to redo it); a rerun with another configuration
adds its own records beside the old ones. A video that cannot be read gets an error record with the reason and the
run goes on; the exit status is 1 if any video failed. Under torchrun or `accelerate launch` every process takes
its share of the inputs and writes its own shard; the first process merges them at the end, one record per video.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ..policies import BUDGET_FIELDS, Full
from . import kv_memory, record_file
from .kv_memory import parse_size
from .samples import ensure_samples
from .video import VideoError, collect_inputs, read_frames

KV_MEMORY_BATCH_CAP = 64  # with --kv-memory: the frames of a whole batch are held in memory at once


def _policy_label(policy) -> dict:
    amounts = {k: getattr(policy, k) for k in BUDGET_FIELDS if getattr(policy, k) is not None}
    changed = policy.changed_settings()
    return {"policy": policy.name, **amounts, **({"settings": changed} if changed else {})}


def max_new_tokens(model, args) -> int:
    from . import prompts

    return args.max_new_tokens or prompts.answer_tokens(model)


def caption_batch(model, processor, items, policy, args, compare: bool, config: dict) -> tuple[list[dict], object]:
    """Caption equally long frame lists in one generate call: (one record per item, the compressed run). An item
    is (path, frames, its identity as read: record_file.identity)."""
    from . import prompts, timed_run

    inputs = prompts.frames_inputs(
        processor, [fr for _, fr, _ in items], args.question, device=next(model.parameters()).device
    )
    max_new = max_new_tokens(model, args)
    compiled = getattr(args, "compile", False)
    run = timed_run.run(model, processor, inputs, policy, max_new, compile=compiled)
    full = timed_run.run(model, processor, inputs, Full(), max_new, compile=compiled) if compare else None
    records = []
    for b, (path, frames, ident) in enumerate(items):
        st = run.row_stats[b]
        rec = {
            "path": str(path),
            **ident,
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
            "config": config,
        }
        if full is not None:
            rec["caption_full"] = full.texts[b].strip()
            rec["agrees_with_full"] = rec["caption"] == rec["caption_full"]
        records.append(rec)
    return records, run


def parse_args(argv=None) -> argparse.Namespace:
    from .command_line import add_budget_args, add_compile_arg

    p = argparse.ArgumentParser(prog="vlcache caption", description=__doc__.splitlines()[0])
    p.add_argument(
        "inputs", nargs="*", help="videos, images, folders, or .txt files listing paths (default: the sample videos)"
    )
    p.add_argument("-o", "--out", default="captions.jsonl")
    p.add_argument(
        "--model",
        default="embedded",
        help="hub id, local path, embedded-qwen (the Qwen2-VL embedded model) or tiny (default: the embedded Llava)",
    )
    p.add_argument("--policy", default="vlcache")
    add_budget_args(p, default="--vision-budget 0.25")
    add_compile_arg(p)
    p.add_argument("--frames", type=int, default=None, help="frames spread uniformly over each video (default 8)")
    p.add_argument("--fps", type=float, default=None, help="sample at this rate instead of --frames")
    p.add_argument("--max-frames", type=int, default=64, help="cap on frames per video")
    p.add_argument("--batch", type=int, default=None, help="videos per generate call (default 1; with --kv-memory, "
                   f"the most a batch may hold, default {KV_MEMORY_BATCH_CAP})")  # fmt: skip
    p.add_argument("--kv-memory", default=None, metavar="SIZE", help="pack videos of one shape into batches whose KV "
                   "cache stays within SIZE (8GB, 512MiB, ...), measured on the first video of each shape")  # fmt: skip
    p.add_argument("--question", default=None, help="the prompt (default: the model's caption question)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--compare", action="store_true", help="also caption with the full cache (default with the samples)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="redo videos already in the output")
    args = p.parse_args(argv)
    for flag in ("batch", "frames", "max_frames", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.fps is not None and not args.fps > 0:  # also NaN
        raise ValueError(f"--fps must be more than 0, got {args.fps}")
    if args.fps is not None and args.frames is not None:
        raise ValueError("--frames and --fps both given: frames come either uniformly (--frames) or at a rate (--fps)")
    args.frames = 8 if args.frames is None else args.frames
    if args.question is not None and not args.question.strip():
        raise ValueError("--question is empty")
    args.kv_memory = parse_size(args.kv_memory) if args.kv_memory is not None else None
    args.batch = args.batch or (KV_MEMORY_BATCH_CAP if args.kv_memory else 1)
    return args


def run_config(args, policy, model, compare: bool) -> dict:
    """Everything that changes a caption; a video is done only if it has a success under exactly this. The
    weights' digest, not just --model: a checkpoint retrained in place is another model."""
    from ..fingerprint import weights_digest

    config = {
        "model": args.model,
        "weights": weights_digest(model),
        **_policy_label(policy),
        "frames": None if args.fps else args.frames,
        "fps": args.fps,
        "max_frames": args.max_frames,
        "question": args.question,
        "max_new_tokens": args.max_new_tokens,
        "compare": compare,
    }
    return json.loads(json.dumps(config))  # as it reads back from the file (tuples become lists)


@contextmanager
def exclusive_output(out: Path, state):
    """The output's lock, taken by the first process for the whole job; every process learns whether it got it,
    so that all of them stop when another run holds it."""
    with ExitStack() as stack:
        error = None
        if state.is_main_process:
            try:
                stack.enter_context(record_file.locked(out))
            except record_file.OutputBusyError as e:
                error = str(e)
        if state.num_processes > 1:
            import torch.distributed as dist

            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error:
            raise record_file.OutputBusyError(error)
        yield


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch
    from accelerate import PartialState
    from tqdm import tqdm

    from . import model_loading, prompts
    from .command_line import policy_from_args

    # cpu=True without CUDA: under torchrun a plain PartialState() on a CPU machine sets up no process group,
    # and every process takes itself for rank 0 of 1 (each captions everything)
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    policy = policy_from_args(args.policy, args)  # bad settings fail before any work
    samples = not args.inputs
    paths = ensure_samples() if samples else collect_inputs(args.inputs)
    compare = args.compare or samples
    if not paths:
        raise ValueError("no inputs: give videos, images, folders or .txt lists")
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot write {out}: {e.strerror or e}") from None
    with exclusive_output(out, state):
        model, processor = model_loading.load(args.model, device=state.device if world > 1 else None, flag="--model")
        args.question = args.question or prompts.default_question(model)
        config = run_config(args, policy, model, compare)
        if rank == 0:
            record_file.merge(out)  # folds a killed run's shards in and sets a torn last line aside
        state.wait_for_everyone()
        key = json.dumps(config, sort_keys=True)
        # a video is its resolved file (two ways of typing it are one video, captioned once) and the version of it
        # on disk: a finished record counts only for the same file, configuration and version
        idents = {q: record_file.identity(q) for q in paths}
        first = {}
        for q in paths:
            first.setdefault(idents[q]["file"], q)
        paths = list(first.values())
        finished = {r.get("file"): r for r in _ok(record_file.read(out)[0]) if record_file.record_key(r)[1] == key}
        done = {q for q in paths if record_file.is_current(finished.get(idents[q]["file"], {}), idents[q])}
        done = done if args.resume else set()  # --no-resume: every video again, its new record replacing the old
        skipped = len(done)
        mine = [q for q in paths[rank::world] if q not in done]
        sink_path = out if world == 1 else out.with_name(f"{out.name}.shard{rank}")
        started = time.time()
        with (
            record_file.Appender(sink_path) as sink,
            tqdm(
                total=len(mine),
                desc=f"caption[{rank}]" if world > 1 else "caption",
                unit="video",
                disable=rank > 0 and not sys.stderr.isatty(),
            ) as bar,
        ):
            Captioner(model, processor, policy, args, compare, config, sink, bar, rank if world > 1 else None).run(mine)
        state.wait_for_everyone()
        if rank != 0:
            return 0
        these = {idents[q]["file"] for q in paths}
        records = [r for r in record_file.merge(out) if r.get("file") in these and record_file.record_key(r)[1] == key]
        seconds = time.time() - started
        print_summary(records, out, seconds, skipped, compare, policy)
        return 1 if any(r["status"] != "ok" for r in records) else 0


def _ok(records):
    return [r for r in records if r["status"] == "ok"]


class Captioner:
    """One process's share of the job: read each video, batch videos of one shape, append a record per video as
    soon as its batch is done."""

    def __init__(self, model, processor, policy, args, compare, config, sink, bar, rank):
        self.model, self.processor, self.policy, self.args = model, processor, policy, args
        self.compare, self.config, self.sink, self.bar, self.rank = compare, config, sink, bar, rank
        self.pending: dict[tuple, list] = {}
        self.capacity: dict[tuple, int] = {}  # --kv-memory: videos per batch, per shape

    def run(self, paths) -> None:
        args = self.args
        for path in paths:
            # the file's version taken before its frames are read: if it changes meanwhile, the record names the
            # older version and a rerun captions the new one (never the reverse)
            ident = record_file.identity(path)
            try:
                frames = read_frames(
                    path, frames=None if args.fps else args.frames, target_fps=args.fps, cap=args.max_frames
                )
            except VideoError as e:
                self.emit({"path": str(path), **ident, "status": "error", "error": str(e),
                           **_policy_label(self.policy), "model": args.model, "config": self.config})  # fmt: skip
                self.bar.update(1)
                continue
            if args.kv_memory is None:
                shape, cap = len(frames), args.batch  # a batch holds videos of one length
                if self.pending and shape not in self.pending:
                    self.flush_all()
            else:
                shape = (len(frames), frames[0].size)  # one prompt length: rows without padding
                if shape not in self.capacity:
                    run = self.caption([(path, frames, ident)])
                    self.capacity[shape] = self.measure(run, len(frames))
                    continue
                cap = self.capacity[shape]
            self.pending.setdefault(shape, []).append((path, frames, ident))
            if len(self.pending[shape]) >= cap:
                self.caption(self.pending.pop(shape))
        self.flush_all()

    def flush_all(self) -> None:
        for shape in list(self.pending):
            self.caption(self.pending.pop(shape))

    def caption(self, items):
        records, run = caption_batch(self.model, self.processor, items, self.policy, self.args, self.compare,
                                     self.config)  # fmt: skip
        for rec in records:
            self.emit(rec)
        self.bar.update(len(items))
        return run

    def measure(self, run, frames: int) -> int:
        stats = run.prefill_stats
        new_tokens = max_new_tokens(self.model, self.args)  # the limit: a later video may not stop early
        need = kv_memory.per_video_bytes(stats, new_tokens, self.policy, self.compare)
        fits = kv_memory.capacity(self.args.kv_memory, need, self.args.batch)
        if need > self.args.kv_memory:
            warning = (
                f"vlcache: warning: a video of {stats.prompt_tokens} tokens needs about {need:,} bytes of KV, "
                f"more than --kv-memory {self.args.kv_memory:,}; captioning those one at a time"
            )
            print(warning, file=sys.stderr)
        return fits

    def emit(self, rec: dict) -> None:
        if self.rank is not None:
            rec["rank"] = self.rank
        try:
            self.sink.write(rec)
        except OSError as e:
            raise OSError(
                f"cannot write {self.sink.path}: {e.strerror or e}; the {self.sink.written} records this run "
                "wrote are kept, rerun to finish the rest"
            ) from None


def print_summary(records, out, seconds, skipped, compare, policy):
    ok = [r for r in records if r["status"] == "ok"]
    bad = [r for r in records if r["status"] != "ok"]
    if records:  # the header names this run's configuration: every record listed was made under it
        label = _policy_label(policy)
        amounts = ", ".join(
            [f"{k}={label[k]}" for k in BUDGET_FIELDS if k in label]
            + [f"{k}={v}" for k, v in label.get("settings", {}).items()]
        )
        model = records[0]["model"]
        print(f"\nmodel {model}; policy {label['policy']}({amounts})" + (" against the full cache" if compare else ""))
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
    fresh = max(len(ok) - skipped, 0)  # captioned by this run
    print(
        f"\ncaptioned {fresh}, skipped {skipped} (already in {out}), failed {len(bad)}; KV saved {total_saved:,} bytes"
        + (f"; captions equal to the full cache's: {agree}/{len(ok)}" if compare and ok else "")
        + f"; {seconds:.1f}s"
        + (f"; {3600 * fresh / seconds:,.0f} videos/hour" if fresh and seconds > 0 else "")
    )


if __name__ == "__main__":
    from .command_line import run_main

    sys.exit(run_main(main))
