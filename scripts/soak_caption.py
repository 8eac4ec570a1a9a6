"""Soak test of `vlcache caption`'s output file (a script, not part of the test suite).

    python scripts/soak_caption.py                      # 200 jobs over 12 tiny videos (a few minutes on 2 cores)
    python scripts/soak_caption.py --jobs 500 --pair 0.5 --keep out/soak

Runs many caption jobs into ONE output file, each over a random subset of a small video folder under one of two
configurations (the default policy, or SnapKV at 30%), often two started at the same moment (two writers on one
file), kills a share of them with SIGKILL at a random moment, and between jobs cuts a torn piece of a record onto
the end of the file (what a crash mid-write leaves). After every job it checks that no record ever seen finished has
gone missing; at the end one clean run per configuration must exit 0 and leave exactly one valid record per video
and configuration, each with the caption a clean reference run gives. Exit status 1 on any violation.

Jobs are forked from this process (which imports vlcache but never runs a model, so the children start in a
fraction of a second instead of re-importing torch); each opens, locks and writes the output on its own, as
separate `vlcache caption` processes do.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

CONFIGS = {"vlcache": [], "snapkv": ["--policy", "snapkv", "--budget", "0.3"]}
BUSY = "is being written by another vlcache caption run"


def _preload() -> None:
    """Import what a caption run imports (no model is run here), so that forked jobs start at once."""
    import accelerate  # noqa: F401
    import tqdm  # noqa: F401
    import transformers as T

    import vlcache.apps.evaluation.embedded_model  # noqa: F401
    import vlcache.hf.session  # noqa: F401

    T.LlavaForConditionalGeneration, T.CLIPImageProcessorPil, T.LlavaProcessor  # noqa: B018 - lazy modules load here


def _child(argv: list[str], log: Path) -> None:
    import torch

    torch.set_num_threads(1)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    from vlcache.apps.cli import main

    os._exit(main(argv))


def _records(path: Path) -> list[dict]:
    """The whole records of the file now (a torn or half-appended last line is not one)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "path" in rec:
            out.append(rec)
    return out


def _finished(path: Path) -> set[tuple[str, str]]:
    return {(r["path"], r["policy"]) for r in _records(path) if r.get("status") == "ok"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--videos", type=int, default=12)
    p.add_argument("--pair", type=float, default=0.35, help="chance that two jobs start at the same moment")
    p.add_argument("--kill", type=float, default=0.35, help="share of jobs killed with SIGKILL")
    p.add_argument("--torn", type=float, default=0.2, help="chance of a torn line before a job")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    args = p.parse_args(argv)

    from vlcache.apps import record_file
    from vlcache.apps.samples import ensure_samples

    _preload()

    rng = random.Random(args.seed)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vlcache-soak-"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    videos = [str(v) for v in ensure_samples(work / "videos", count=args.videos, frames=4)]
    common = ["--frames", "4"]
    out = work / "o.jsonl"
    for f in work.glob("o.jsonl*"):
        f.unlink()
    ctx = multiprocessing.get_context("fork")

    started = time.time()
    reference = {}
    for name, flags in CONFIGS.items():  # clean runs, in children too: this process never runs torch itself
        ref = work / f"reference-{name}.jsonl"
        ref.unlink(missing_ok=True)
        proc = ctx.Process(
            target=_child,
            args=(["caption", *videos, "-o", str(ref), *common, *flags], work / "logs" / f"ref-{name}.log"),
        )
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            print(f"reference run {name} failed: see {work / 'logs'}")
            return 1
        reference.update({(r["path"], r["policy"]): r["caption"] for r in _records(ref)})

    outcome, violations = Counter(), []
    seen: set[tuple[str, str]] = set()
    running: list[tuple[int, object, float | None, Path]] = []  # (job, process, kill at, log)
    launched = 0
    while launched < args.jobs or running:
        for item in list(running):
            job, proc, kill_at, log = item
            if proc.exitcode is None and kill_at is not None and time.time() >= kill_at:
                os.kill(proc.pid, signal.SIGKILL)
            if proc.exitcode is None:
                continue
            proc.join()
            running.remove(item)
            text = log.read_text(errors="replace")
            if proc.exitcode == -signal.SIGKILL:
                outcome["killed"] += 1
            elif proc.exitcode == 0:
                outcome["finished"] += 1
            elif proc.exitcode == 2 and BUSY in text:
                outcome["refused: output busy"] += 1
            else:
                violations.append(f"job {job}: exit {proc.exitcode}: {text.strip().splitlines()[-1:]}")
            now = _finished(out)
            lost = seen - now
            if lost:
                violations.append(f"after job {job}: {len(lost)} finished records gone, e.g. {sorted(lost)[0]}")
            seen |= now
        if launched < args.jobs and not running:
            if rng.random() < args.torn and out.exists():
                with record_file.locked(out):  # as the crashed writer held it
                    recs = out.read_text().splitlines()
                    if recs:
                        line = rng.choice(recs)
                        with open(out, "a") as f:
                            f.write(line[: rng.randint(1, len(line) - 1)])
                        outcome["torn lines added"] += 1
            pair = rng.random() < args.pair and launched + 1 < args.jobs
            outcome["pairs"] += pair
            for _ in range(2 if pair else 1):
                name = rng.choice(list(CONFIGS))
                subset = rng.sample(videos, rng.randint(2, len(videos)))
                log = work / "logs" / f"job{launched}.log"
                argv = ["caption", *subset, "-o", str(out), *common, *CONFIGS[name]]
                if rng.random() < 0.1:
                    argv.append("--no-resume")
                if rng.random() < 0.2:
                    argv += ["--kv-memory", "64MB"]
                proc = ctx.Process(target=_child, args=(argv, log))
                proc.start()
                kill_at = time.time() + rng.uniform(0.01, 0.6) if rng.random() < args.kill else None
                running.append((launched, proc, kill_at, log))
                launched += 1
        time.sleep(0.01)

    for name, flags in CONFIGS.items():  # the clean finish a user would run
        proc = ctx.Process(
            target=_child,
            args=(["caption", *videos, "-o", str(out), *common, *flags], work / "logs" / f"final-{name}.log"),
        )
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            violations.append(f"final run {name}: exit {proc.exitcode}")

    lines = out.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line must parse now
    keys = Counter((r["path"], r["policy"]) for r in records)
    want = {(v, n) for v in videos for n in CONFIGS}
    missing, extra = want - set(keys), set(keys) - want
    duplicated = [k for k, n in keys.items() if n > 1]
    wrong = [
        k
        for k in keys
        if k in reference and next(r for r in records if (r["path"], r["policy"]) == k)["caption"] != reference[k]
    ]
    not_ok = [r["path"] for r in records if r["status"] != "ok"]
    leftovers = [f.name for f in work.glob("o.jsonl.*") if not f.name.endswith((".lock", ".torn"))]
    checks = {"missing": missing, "unexpected": extra, "duplicated": duplicated, "not ok": not_ok,
              "caption differs from the reference": wrong, "leftover files": leftovers}  # fmt: skip
    for what, bad in checks.items():
        if bad:
            violations.append(f"final file: {len(bad)} {what}, e.g. {sorted(bad)[0]}")
    torn = work / "o.jsonl.torn"
    set_aside = len(torn.read_text().splitlines()) if torn.exists() else 0

    print(f"soak: {args.jobs} caption jobs over {args.videos} videos x {len(CONFIGS)} configurations, "
          f"{outcome['pairs']} pairs started together, in {time.time() - started:.0f}s")  # fmt: skip
    for what in ("finished", "refused: output busy", "killed", "torn lines added"):
        print(f"  {what:<24} {outcome[what]}")
    print(f"  {'torn lines set aside':<24} {set_aside} (pieces cut twice with no run between make one line)")
    print(f"  {'finished records seen':<24} {len(seen)} (none ever lost: {not any('gone' in v for v in violations)})")
    print(f"  final file: {len(records)} records, {len(keys)} distinct (video, configuration), expected {len(want)}; "
          f"all equal the reference captions: {not wrong}")  # fmt: skip
    for v in violations[:20]:
        print("  VIOLATION", v)
    print("soak: OK" if not violations else f"soak: FAILED ({len(violations)} violations; see {work})")
    if not violations and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
