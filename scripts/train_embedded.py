"""Train the embedded model on the synthetic video tasks and save it into the package (not run in CI).

    python scripts/train_embedded.py --device cuda --out /tmp/m      # the default curriculum from random weights
    python scripts/train_embedded.py --device cuda --minutes 7       # scale every stage to fit about 7 minutes
    python scripts/train_embedded.py --init vlcache/embedded --curriculum 4-10:40000 --weights lookup=10
    python scripts/train_embedded.py --scale 0.01 --out /tmp/m       # a quick CPU trial
    python scripts/train_embedded.py --device cuda --projector-norm 0.05 --out /tmp/m   # tried: lookup stays ~0.6
    python scripts/train_embedded.py --batch 32 --lr 0.0015 --curriculum "1:300,2:1500,4:1500,8:1500,4-10:8000" \
        --weights lookup=4 --projector-norm 0.1 --attend 1 --out /tmp/m   # CPU, 43 min: lookup 0.82 (run 1)
    python scripts/train_embedded.py --init /tmp/m --batch 32 --lr 0.0005 --curriculum 4-10:5000 \
        --weights lookup=10,count=3 --projector-norm 0.1 --attend 1 --hard-colors bc --hard-share 0.4 --out /tmp/m6

    python scripts/train_embedded.py --family qwen2_vl --threads 1 --batch 32 --lr 0.001 --text-from vlcache/embedded \
        --curriculum 4-10:2500 --weights where=3,lookup=8,count=3 --projector-norm 0.1 --attend 1 --out /tmp/q
        # the Qwen2-VL one (`embedded_qwen/`), started from the Llava: docs/embedded_qwen.md

`--family qwen2_vl` trains the second embedded model, a Qwen2-VL (M-RoPE, 2 x 2 merged patches, each frame an
image between its vision markers), on the same tasks and losses (the projector norm penalty acts on its merger).
With `--text-from` it starts from a trained Llava instead of random weights: the text model copied
(`copy_text_model`), the vision tower first fitted to the Llava's projector outputs (`distill_vision`: one merged
token covers the same pixels as one Llava patch); then the usual training, which has to learn the new positions.

The shipped Llava came from six CPU runs, each continuing the last (docs/lookup.md has the table); its
training.json holds every run's exact command, device, wall time and held-out accuracy (`init_from`, nested). The default curriculum below has run
from random weights only scaled down (--scale 0.137, 8 minutes on a shared H100: needle 0.76, count 0.29 at 8
frames, loss still falling); its full length (46,600 steps of 256 videos) has not been run to the end.

Batches are drawn as tensors on the training device (`vlcache.apps.evaluation.tensor_tasks`), from the same distribution
as `tasks.make_example`. A curriculum over 1, 2, 4, 8 frames, then 4 to 10 drawn per batch, over a mixture of all
five tasks (the keyed lookup and counting weighted up); the loss is on the answer only, plus, with --attend, a loss
on where one head looks while answering the lookup (`attention_loss`: what made the lookup learnable). At the end
it measures held-out accuracy with `make_example` on 8-frame videos (seed offset 10**6, never drawn in training) and on 16-frame
ones (longer than any seen in training), and writes them with the wall time and the exact settings to
training.json beside the weights. Seeded; a GPU run is reproducible up to the GPU's nondeterministic reductions.
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

from vlcache.apps.evaluation.embedded_model import (  # noqa: E402
    BUILDERS,
    EMBEDDED_DIR,
    EMBEDDED_QWEN_DIR,
    FAMILIES,
    load_embedded,
)
from vlcache.apps.evaluation.quality import accuracy  # noqa: E402
from vlcache.apps.evaluation.tasks import TASKS  # noqa: E402
from vlcache.apps.evaluation.tensor_tasks import color_indices, draw_batch, processor, qwen_patches  # noqa: E402
from vlcache.hf.compat import attn_implementation, from_pretrained  # noqa: E402

# task sampling weights
WEIGHTS = {"needle": 1, "where": 1, "lookup": 3, "count": 2, "describe": 2}
# (frames, or a range drawn per batch; steps). Short videos first so that colours and frame markers are learned on
# easy credit assignment, then most of the steps on 4 to 10 frames: training on short videos alone does not carry
# to 8 frames (tried: a 2-4-frame lookup stage at the end dropped 8-frame needle accuracy from 1.00 to 0.71).
CURRICULUM = [(1, 600), (2, 1000), (4, 2000), (8, 3000), ((4, 10), 40000)]
HELD_OUT = 10**6
OUT = {"llava": EMBEDDED_DIR, "qwen2_vl": EMBEDDED_QWEN_DIR}  # where each family's model ships


def projector(model):
    """The module whose outputs are the vision tokens the text model reads: Llava's projector, Qwen2-VL's merger."""
    return model.model.visual.merger if model.config.model_type == "qwen2_vl" else model.model.multi_modal_projector


def parse_curriculum(text: str) -> list:
    stages = []
    for part in text.split(","):
        frames, steps = part.split(":")
        lo, _, hi = frames.partition("-")
        stages.append(((int(lo), int(hi)) if hi else int(lo), int(steps)))
    return stages


def tasks_for(frames: int) -> list[str]:
    return [t for t in TASKS if not (t in ("where", "lookup") and frames == 1)]


def train_step(model, opt, inputs: dict, penalty=None, attend=None) -> torch.Tensor:
    """One optimiser step on a batch, plus `penalty()` if given (read after the forward pass) and `attend`'s
    attention loss if given; returns the task loss (a tensor: reading it would sync the GPU)."""
    if attend is None:
        task_loss = model(**inputs).loss
        loss = task_loss
    else:
        previous = attn_implementation(model.config)
        model.set_attn_implementation("eager")  # the only one that returns attention probabilities
        out = model(**inputs, output_attentions=True)
        model.set_attn_implementation(previous)  # the saved model keeps what it was built with
        task_loss = out.loss
        loss = task_loss + attend(out.attentions)
    if penalty is not None:
        loss = loss + penalty()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return task_loss


def projector_norm_penalty(model, weight: float):
    """weight x mean squared log of the RMS of the projector's outputs, a callable for `train_step`.

    The projector's outputs grow to norms near 1,500 with their colours differing mostly in length along one
    direction; attention reads keys through RMSNorm, which divides the length out, and a one-head lookup of the named
    colour is then capped near 0.9 (scripts/lookup_probe.py). Pulling the RMS towards 1 keeps colours apart by
    direction (a 1,000-step CPU continuation with weight 0.05 took that cap at the first layer to 1.00). It did not
    make the lookup learnable on its own: H100 runs with it, continued or from random weights, stayed near 0.6; with
    `attention_loss` as well it is learned (docs/lookup.md)."""
    seen = {}
    projector(model).register_forward_hook(lambda mod, args, out: seen.__setitem__("out", out))

    def penalty() -> torch.Tensor:
        rms = seen.pop("out").float().pow(2).mean(-1).sqrt()
        return weight * rms.log().pow(2).mean()

    return penalty


def attention_loss(weight: float, layer: int, targets: torch.Tensor):
    """weight x -log of the attention that head 0 of `layer` pays, from the position that predicts the answer
    (the "=" token), to the vision token that holds it; a callable on the model's attentions for `train_step`.

    The keyed lookup needs a head whose query, made from the colour letter in the question, picks that colour's patch
    among the other objects. Trained on the answer alone, a head learns to find the objects but not which one (the
    loss sits at log(objects), every try: docs/lookup.md); told where to look, the query is learned
    in about a thousand steps, once the projector norm penalty keeps colours apart after RMSNorm."""

    def loss(attentions) -> torch.Tensor:
        probs = attentions[layer][:, 0, -2]  # [batch, keys]: the query at "=", second to last (one answer token)
        return -weight * probs.gather(1, targets[:, None]).clamp_min(1e-6).log().mean()

    return loss


def copy_text_model(model, source) -> int:
    """Start `model`'s text model from `source`'s, a trained embedded Llava of the same widths (both name the
    embeddings, decoder layers, final norm and head alike): every text weight is copied, and the q/k/v biases that
    Qwen2 adds and Llama lacks start at zero, so the copy computes what the Llava's language model computes on the
    same input vectors. Returns the number of tensors copied."""
    text = {k: v for k, v in source.state_dict().items() if k.startswith(("model.language_model.", "lm_head."))}
    target = model.state_dict()
    wrong = [k for k, v in text.items() if k not in target or target[k].shape != v.shape]
    if wrong:
        raise ValueError(f"--text-from: the two text models differ ({', '.join(wrong[:3])}); give the same widths")
    missing = set(model.load_state_dict(text, strict=False).missing_keys)
    biases = {k for k in missing if k.startswith("model.language_model.") and k.endswith("_proj.bias")}
    if {k for k in missing if k.startswith(("model.language_model.", "lm_head."))} != biases:
        raise ValueError("--text-from: the source lacks text weights other than the q/k/v biases")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in biases:
                param.zero_()
    return len(text)


def distill_vision(model, teacher, steps: int, batch: int, g, device, lr: float = 2e-3) -> list[float]:
    """Fit a Qwen2-VL's vision tower to a Llava `teacher`'s projector outputs on the same frames, `steps` steps of
    `batch` videos of 8 frames (needle, lookup, count, describe in turn), lr `lr` decaying linearly. A Qwen2-VL
    token (a 2 x 2 merge of 4-pixel patches of the 2x-upscaled frame) covers the same 4 x 4 pixels as a Llava patch,
    in the same order, so after `copy_text_model` the text model reads the vectors it was trained on. Loss:
    squared error over the teacher's mean square. Returns the loss every 100 steps."""
    llava, qwen = processor("llava").image_processor, processor("qwen2_vl").image_processor
    if list(llava.image_mean) != list(qwen.image_mean) or list(llava.image_std) != list(qwen.image_std):
        raise ValueError("the two processors normalise differently: the Llava's pixels cannot be reused")
    vision = model.model.visual
    opt = torch.optim.AdamW(vision.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.005, 1 - i / steps))
    losses = []
    for step in range(steps):
        pixels = draw_batch(("needle", "lookup", "count", "describe")[step % 4], 8, batch, g, device)[0]["pixel_values"]
        with torch.no_grad():
            want = teacher.model.get_image_features(pixel_values=pixels)
            want = torch.cat([x.reshape(-1, x.shape[-1]) for x in getattr(want, "pooler_output", want)])
        grid = torch.tensor([[1, 8, 8]], device=device).expand(pixels.shape[0], 3)
        got = model.model.get_image_features(pixel_values=qwen_patches(pixels), image_grid_thw=grid)
        got = torch.cat(list(getattr(got, "pooler_output", got)))  # [frames * 16, hidden], frame by frame
        loss = (got - want).pow(2).mean() / want.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 6))
            print(f"distill {step + 1:5d}/{steps}  relative squared error {losses[-1]:.5f}", flush=True)
    return losses


def step_seconds(args, device) -> float:
    """Seconds per training step on 7-frame videos (the middle of the long stage), on a throwaway model."""
    model = BUILDERS[args.family](args.seed, args.layers, args.hidden, args.heads, args.kv_heads).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    g = torch.Generator(device).manual_seed(12345)
    for i in range(25):
        if i == 5:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        train_step(model, opt, draw_batch(TASKS[i % len(TASKS)], 7, args.batch, g, device, family=args.family)[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / 20


def reproduce(args) -> str:
    """The arguments that repeat this run, with --minutes resolved to the --scale it picked."""
    parts = [f"--family {args.family}"] if args.family != "llava" else []  # the Llava's records predate --family
    parts += [f"--device {args.device}", f"--seed {args.seed}", f"--batch {args.batch}", f"--lr {args.lr}"]
    parts += [f"--layers {args.layers}", f"--hidden {args.hidden}", f"--heads {args.heads}"]
    parts += [f"--kv-heads {args.kv_heads}", f"--scale {args.scale}"]
    if args.projector_norm:
        parts.append(f"--projector-norm {args.projector_norm}")
    if args.attend:
        parts.append(f"--attend {args.attend} --attend-layer {args.attend_layer}")
    if args.hard_colors is not None:
        parts.append(f"--hard-colors {args.hard_colors} --hard-share {args.hard_share}")
    if args.text_from is not None:
        parts.append(f"--text-from {args.text_from} --distill-steps {args.distill_steps}")
    for name in ("init", "curriculum", "weights"):
        if getattr(args, name):
            parts.append(f"--{name} {getattr(args, name)}")
    return " ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="llava", choices=FAMILIES, help="which embedded model (default: the Llava)")
    p.add_argument("--out", default=None, help="where to save (default: the family's folder in the package)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps")
    p.add_argument("--minutes", type=float, default=None, help="pick --scale from a timing probe to train this long")
    p.add_argument("--eval-n", type=int, default=400)
    p.add_argument("--init", default=None, help="continue from a saved model directory instead of random weights")
    p.add_argument("--curriculum", default=None, help='stages as "frames:steps,...", a range as "4-10:5000"')
    p.add_argument("--weights", default=None, help='task sampling weights as "lookup=4,count=2" (others keep theirs)')
    p.add_argument(
        "--projector-norm", type=float, default=0.0, help="weight of a penalty pulling the projector's output RMS to 1"
    )
    p.add_argument("--attend", type=float, default=0.0, help="weight of the lookup's attention loss (attention_loss)")
    p.add_argument("--attend-layer", type=int, default=1, help="the layer whose head 0 --attend supervises")
    p.add_argument(
        "--hard-colors",
        default=None,
        help='colour keys a model confuses, e.g. "bcr": --hard-share of the lookup batches draw objects of only these',
    )
    p.add_argument("--hard-share", type=float, default=0.5, help="share of lookup batches --hard-colors draws")
    p.add_argument(
        "--text-from",
        default=None,
        help="qwen2_vl from random weights only: copy this trained Llava's text model (copy_text_model) and fit the "
        "vision tower to its projector (--distill-steps) before training",
    )
    p.add_argument("--distill-steps", type=int, default=600, help="with --text-from: distill_vision's steps")
    args = p.parse_args(argv)
    if args.text_from is not None and (args.family != "qwen2_vl" or args.init):
        p.error("--text-from starts a qwen2_vl model from random weights: give --family qwen2_vl and no --init")
    if args.attend and not 0 <= args.attend_layer < args.layers:
        p.error(f"--attend-layer {args.attend_layer}: the model has layers 0 to {args.layers - 1}")
    if args.hard_colors is not None:
        if not 0 < args.hard_share <= 1:
            p.error(f"--hard-share {args.hard_share}: give a share in (0, 1]")
        try:
            color_indices(args.hard_colors, least=2)  # a lookup names one of at least two objects
        except ValueError as e:
            p.error(f"--hard-colors: {e}")

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    curriculum = parse_curriculum(args.curriculum) if args.curriculum else CURRICULUM
    weights = dict(WEIGHTS)
    for item in (args.weights or "").split(","):
        if item:
            name, value = item.split("=")
            weights[name] = float(value)
    if args.minutes:
        probe = step_seconds(args, device)
        args.scale = round(args.minutes * 60 / (probe * sum(s for _, s in curriculum)), 3)
        print(f"{probe * 1000:.1f} ms a step at 7 frames: --scale {args.scale}", flush=True)
    stages = [(f, max(1, int(s * args.scale))) for f, s in curriculum]
    total = sum(s for _, s in stages)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    g = torch.Generator(device).manual_seed(args.seed)
    model = BUILDERS[args.family](args.seed, args.layers, args.hidden, args.heads, args.kv_heads)
    if args.init:
        model = from_pretrained(type(model), args.init)
    model.to(device).train()
    started = time.time()  # the distillation counts in the run's wall time
    distill = None
    if args.text_from is not None:
        teacher = load_embedded(args.text_from, device=device)[0]
        if teacher.config.model_type != "llava":
            p.error(f"--text-from {args.text_from}: a Llava embedded model, not {teacher.config.model_type}")
        copied = copy_text_model(model, teacher)
        print(f"copied {copied} text tensors from {args.text_from}", flush=True)
        distill = distill_vision(model, teacher, args.distill_steps, args.batch, g, device)
        del teacher
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    penalty = projector_norm_penalty(model, args.projector_norm) if args.projector_norm else None
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, total) / total))
    )
    step = 0
    per_task: dict[str, float] = {}
    for stage_frames, steps in stages:
        running = None
        for _ in range(steps):
            frames = (
                stage_frames
                if isinstance(stage_frames, int)
                else int(rng.integers(stage_frames[0], stage_frames[1] + 1))
            )
            tasks = tasks_for(frames)
            w = np.array([weights[t] for t in tasks], dtype=float)
            task = tasks[int(rng.choice(len(tasks), p=w / w.sum()))]
            # the rng is drawn only with --hard-colors, so that runs without it repeat the earlier ones exactly
            hard = task == "lookup" and args.hard_colors is not None and rng.random() < args.hard_share
            colors = args.hard_colors if hard else None
            if args.attend and task == "lookup":
                inputs, _, targets = draw_batch(
                    task, frames, args.batch, g, device, targets=True, colors=colors, family=args.family
                )
                attend = attention_loss(args.attend, args.attend_layer, targets)
            else:
                inputs = draw_batch(task, frames, args.batch, g, device, colors=colors, family=args.family)[0]
                attend = None
            loss = train_step(model, opt, inputs, penalty, attend)
            sched.step()
            step += 1
            if step % 100 == 0 or step == total:  # .item() syncs: only when reporting
                value = loss.item()
                running = value if running is None else 0.8 * running + 0.2 * value
                per_task[task] = value if task not in per_task else 0.7 * per_task[task] + 0.3 * value
                tasks_loss = " ".join(f"{t} {v:.3f}" for t, v in sorted(per_task.items()))
                print(
                    f"step {step:6d}/{total}  frames {frames:2d}  loss {running:.4f}  ({tasks_loss})"
                    f"  {time.time() - started:6.0f}s",
                    flush=True,
                )
    train_s = time.time() - started
    model.eval()
    results = {}
    for frames in (8, 16):
        for task in TASKS:
            if task in ("where", "lookup") and frames > 10:
                continue
            acc = accuracy(model, processor(args.family), task, frames, None, args.eval_n, HELD_OUT + frames, batch=200)
            results[f"{task}@{frames}"] = acc
            print(f"held-out {task:9s} {frames:2d} frames: {acc:.3f}", flush=True)
    out = Path(args.out or OUT[args.family])
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu").save_pretrained(out)
    processor(args.family).save_pretrained(out)
    meta = {
        "family": args.family,
        "seed": args.seed,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "curriculum": stages,
        "batch": args.batch,
        "lr": args.lr,
        "layers": args.layers,
        "hidden": args.hidden,
        "threads": args.threads,
        "train_seconds": round(train_s, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "held_out_accuracy": results,
        "init": args.init,
        "weights": weights,
        "projector_norm": args.projector_norm,
        "attend": args.attend,
        "attend_layer": args.attend_layer,
        "hard_colors": args.hard_colors,
        "hard_share": args.hard_share if args.hard_colors is not None else None,
        "text_from": args.text_from,
        "distill_steps": args.distill_steps if args.text_from is not None else None,
        "distill_loss": distill,
        "command": "python scripts/train_embedded.py " + reproduce(args),
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
    }
    parent = Path(args.init or "") / "training.json"
    if args.init and parent.exists():  # a continued run carries its whole lineage, and the total time
        meta["init_from"] = json.loads(parent.read_text())
        meta["train_seconds_total"] = round(
            train_s + meta["init_from"].get("train_seconds_total", meta["init_from"]["train_seconds"]), 1
        )
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
