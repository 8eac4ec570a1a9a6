"""Train the embedded model on the synthetic video tasks and save it into the package (CPU; not run in CI).

    python scripts/train_embedded.py                 # the shipped model: seed 0, writes vlcache/embedded/
    python scripts/train_embedded.py --out /tmp/m    # anywhere else

A curriculum over 1, 2, 4, 8 frames, then 4 to 10 drawn per batch, and a mixture of all five tasks (the keyed lookup
weighted up); the loss is on the answer only. At the end
it measures held-out accuracy on 8-frame videos (seed offset 10**6, never drawn in training) and on 16-frame
ones (longer than any seen in training), and writes them with the wall time to training.json beside the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlcache.evaluation.model import EMBEDDED_DIR, batch_inputs, build_untrained  # noqa: E402
from vlcache.evaluation.tasks import TASKS, make_example, score  # noqa: E402

# task sampling weights
WEIGHTS = {"needle": 1, "where": 1, "lookup": 2, "count": 2, "describe": 2}
# (frames, or a range drawn per batch; steps; weight overrides). The keyed lookup (match a colour named in the
# question to the patch showing it) is learned only once colours are: after the general stages it gets most of the
# batches on two- and four-frame videos, then every task runs on videos of 4 to 10 frames.
CURRICULUM = [
    (1, 600, {}),
    (2, 1000, {}),
    (4, 2000, {}),
    (8, 3000, {}),
    ((4, 10), 5000, {}),
    (2, 2500, {"lookup": 6}),
    (4, 2500, {"lookup": 6}),
    ((4, 10), 6000, {"lookup": 3}),
]
HELD_OUT = 10**6


def parse_curriculum(text: str) -> list:
    stages = []
    for part in text.split(","):
        frames, steps = part.split(":")
        lo, _, hi = frames.partition("-")
        stages.append(((int(lo), int(hi)) if hi else int(lo), int(steps), {}))
    return stages


def tasks_for(frames: int) -> list[str]:
    return [t for t in TASKS if not (t in ("where", "lookup") and frames == 1)]


@torch.no_grad()
def accuracy(model, processor, task: str, frames: int, n: int, seed: int, batch: int = 50) -> float:
    """Accuracy of greedy answers after the "=" the model says first (describe: per frame)."""
    rng = np.random.default_rng(seed)
    right = 0
    for start in range(0, n, batch):
        examples = [make_example(task, frames, rng) for _ in range(min(batch, n - start))]
        inputs = batch_inputs(processor, examples)
        width = len(examples[0].answer) + 1
        out = model.generate(**inputs, max_new_tokens=width, min_new_tokens=width, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        right += sum(score(task, t, e.answer) for t, e in zip(texts, examples))
    return right / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(EMBEDDED_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (for quick trials)")
    p.add_argument("--eval-n", type=int, default=400)
    p.add_argument("--init", default=None, help="continue from a saved model directory instead of random weights")
    p.add_argument("--curriculum", default=None, help='stages as "frames:steps,...", a range as "4-10:5000"')
    p.add_argument("--weights", default=None, help='task sampling weights as "lookup=4,count=2" (others keep theirs)')
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model, processor = build_untrained(args.seed)
    if args.init:
        model = type(model).from_pretrained(args.init)
    model.train()
    curriculum = parse_curriculum(args.curriculum) if args.curriculum else CURRICULUM
    weights = dict(WEIGHTS)
    for item in (args.weights or "").split(","):
        if item:
            name, value = item.split("=")
            weights[name] = float(value)
    stages = [(f, max(1, int(s * args.scale)), w) for f, s, w in curriculum]
    total = sum(s for _, s, _ in stages)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))
    )
    started = time.time()
    step = 0
    per_task: dict[str, float] = {}
    for stage_frames, steps, stage_weights in stages:
        running = None
        for _ in range(steps):
            frames = (
                stage_frames
                if isinstance(stage_frames, int)
                else int(rng.integers(stage_frames[0], stage_frames[1] + 1))
            )
            tasks = tasks_for(frames)
            w = np.array([stage_weights.get(t, weights[t]) for t in tasks], dtype=float)
            task = tasks[int(rng.choice(len(tasks), p=w / w.sum()))]
            examples = [make_example(task, frames, rng) for _ in range(args.batch)]
            loss = model(**batch_inputs(processor, examples, with_answer=True)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            per_task[task] = loss.item() if task not in per_task else 0.95 * per_task[task] + 0.05 * loss.item()
            if step % 100 == 0:
                tasks_loss = " ".join(f"{t} {v:.3f}" for t, v in sorted(per_task.items()))
                print(
                    f"step {step:5d}/{total}  frames {frames:2d}  loss {running:.4f}  ({tasks_loss})  {time.time() - started:6.0f}s",
                    flush=True,
                )
    train_s = time.time() - started
    model.eval()
    results = {}
    for frames in (8, 16):
        for task in TASKS:
            if task in ("where", "lookup") and frames > 10:
                continue
            acc = accuracy(model, processor, task, frames, args.eval_n, HELD_OUT + frames)
            results[f"{task}@{frames}"] = acc
            print(f"held-out {task:9s} {frames:2d} frames: {acc:.3f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    meta = {
        "seed": args.seed,
        "curriculum": stages,
        "batch": args.batch,
        "lr": args.lr,
        "threads": args.threads,
        "train_seconds": round(train_s, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "held_out_accuracy": results,
        "init": args.init,
        "weights": weights,
        "command": "python scripts/train_embedded.py " + " ".join(argv or sys.argv[1:]),
    }
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
