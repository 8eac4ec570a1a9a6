"""Reuse benchmark: time to first token with images seen before, cold prefill against EPIC linking.

    vlcache bench reuse                        # CPU: prompts of 1..16 images of 256 tokens, k = 0, 4, 16, full
    vlcache bench reuse --quick                # tiny, for CI
    vlcache bench reuse --device cuda          # GPU: a 28-layer 3584-wide text tower (Qwen2-VL-7B's), bf16

Then, on the trained embedded model (whose answers mean something, unlike a random model's): accuracy with
reused frames. Each 8-frame video is asked once (storing every frame), then asked again with its frames rotated
(every frame at a new position; the needle, count and describe answers do not depend on the order), cold and
linked with each k.

The model is a Llava built from a config with random weights (a one-layer vision tower, an 8-layer 512-wide text
tower). Every image is stored first (one compile each, not timed); the timed prompts hold the same images in a
shuffled order after a different preamble, so every image lands at a new position. TTFT is the wall time of
`generate(max_new_tokens=1)`, vision tower included for the cold run; agreement is the share of the first 32
generated tokens equal to the cold run's. Ratios are taken against the cold run of the same prompt, in one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers as T

import vlcache

from ... import testing
from ...reuse import ImageKVStore
from . import fill_flags, first_paragraph
from .figure import figure_row

SIZES = {
    "gpu": dict(hidden=3584, layers=28, heads=28, kv=4, grid=16),
    "cpu": dict(hidden=512, layers=8, heads=8, kv=2, grid=16),
    "quick": dict(hidden=64, layers=2, heads=4, kv=2, grid=8),
}


def build(size: dict, device: torch.device):
    g, patch = size["grid"], 4
    cfg = T.LlavaConfig(
        vision_config=T.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=g * patch, patch_size=patch),
        text_config=T.LlamaConfig(**testing.models.text_kwargs(layers=size["layers"], hidden=size["hidden"], heads=size["heads"], kv_heads=size["kv"])),
        image_token_index=testing.models.IMG,
        image_seq_length=g * g,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(0)
    if device.type == "cpu":
        return T.LlavaForConditionalGeneration(cfg).eval()
    with device:  # 7B of random weights: built in bf16 on the GPU, not in fp32 on the host
        return T.LlavaForConditionalGeneration(cfg).to(torch.bfloat16).eval()


def prompt(model, images: torch.Tensor, order: list[int], preamble: str) -> dict:
    """Inputs on the model's device, with the images in `order`, each under its own caption."""
    segs = [preamble]
    for i in range(len(order)):
        segs += [f" picture {i}:", testing.IMAGE]
    inputs = testing.make_inputs(model, segs + [" what do the pictures show?"]).inputs
    inputs["pixel_values"] = images[order]
    return {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def ttft(model, inputs, reps: int) -> float:
    times = []
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# --quick: the values of the flags it was not given (what CI runs); the rest stay the user's, checked the same way
QUICK = dict(images="1,2", ks="0,full", new_tokens=4, reps=1, trained_n=2)
DEFAULTS = dict(images="1,2,4,8,16", ks="0,4,16,full", new_tokens=32, reps=3, trained_n=60)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with --images as counts, --ks as strings ("full" or a count) and --device a torch.device,
    every value checked before a model is built (a mistake is one line naming the flag, exit status 2)."""
    p = argparse.ArgumentParser(prog="vlcache bench reuse", description=first_paragraph(__doc__))
    p.add_argument(
        "--images", default=None, help="images per prompt, comma-separated (default 1,2,4,8,16; --quick: 1,2)"
    )
    p.add_argument(
        "--ks",
        default=None,
        help="first-k values to recompute ('full': everything; default 0,4,16,full; --quick: 0,full)",
    )
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens compared (default 32; --quick: 4)")
    p.add_argument(
        "--reps", type=int, default=None, help="timed runs per cell, their median kept (default 3; --quick: 1)"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes for CI, for the flags not given (and the tiny model)"
    )
    p.add_argument(
        "--trained-n",
        type=int,
        default=None,
        help="videos per task for the embedded-model accuracy (0: skip; default 60; --quick: 2)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="out/reuse")
    args = p.parse_args(argv)
    fill_flags(args, QUICK, DEFAULTS)  # an explicit flag wins over --quick
    for flag, value in (("--new-tokens", args.new_tokens), ("--reps", args.reps)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.trained_n < 0:
        p.error(f"--trained-n must be at least 0 (0: skip), got {args.trained_n}")

    def count(x: str) -> bool:  # digits only: int() also takes "+1", "1_0" and other scripts' digits
        return x.isascii() and x.isdigit()

    images = [x.strip() for x in args.images.split(",") if x.strip()]
    if not images or not all(count(x) and int(x) >= 1 for x in images):
        p.error(f"--images takes comma-separated image counts of at least 1, got {args.images!r}")
    args.images = [int(x) for x in images]
    args.ks = [x.strip() for x in args.ks.split(",") if x.strip()]
    if not args.ks or not all(k == "full" or count(k) for k in args.ks):
        p.error(f"--ks takes comma-separated token counts of at least 0 or 'full', got {','.join(args.ks)!r}")
    args.ks = [k if k == "full" else str(int(k)) for k in args.ks]  # "04" is the row "4"
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device takes a torch device (cpu, cuda, cuda:1), got {args.device!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} needs a GPU")
    size = SIZES["quick" if args.quick else ("cpu" if device.type == "cpu" else "gpu")]
    model = build(size, device)
    counts, ks = args.images, args.ks
    g = size["grid"] * 4
    images = torch.randn(max(counts), 3, g, g, generator=torch.Generator().manual_seed(1)).to(model.dtype)
    store = ImageKVStore(max_bytes=8 << 30)
    with torch.inference_mode():  # warm-up: one-time costs stay out of the numbers
        model.generate(**prompt(model, images[:1], [0], "warm up"), max_new_tokens=2, do_sample=False)
    rows = []
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"Llava text {size['layers']}x{size['hidden']} (random weights, {model.dtype}), {size['grid'] ** 2} tokens per image; {where}"
    )
    header = (
        f"{'images':>6} {'tokens':>7} {'cold TTFT':>10} " + " ".join(f"{'k=' + k:>16}" for k in ks) + "   agreement"
    )
    print(header)
    for n in counts:
        with vlcache.reuse(model, store):  # store every image once (its compile is not timed)
            model.generate(
                **prompt(model, images[:n], list(range(n)), "first look."), max_new_tokens=1, do_sample=False
            )
        order = list(reversed(range(n)))  # each image at another position than when stored
        inputs = prompt(model, images[:n], order, "a different and longer preamble, then")
        cold_t = ttft(model, inputs, args.reps)
        with torch.inference_mode():
            cold_out = model.generate(
                **inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
            )
        row = {"images": n, "tokens": inputs["input_ids"].shape[1], "cold_s": cold_t, "reuse": {}}
        for k in ks:
            kw = {"recompute": "full"} if k == "full" else {"k": int(k)}
            with vlcache.reuse(model, store, **kw) as r:
                t = ttft(model, inputs, args.reps)
                with torch.inference_mode():
                    out = model.generate(
                        **inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False
                    )
            m = inputs["input_ids"].shape[1]
            agree = float((out[0, m:] == cold_out[0, m:]).float().mean())
            row["reuse"][k] = {
                "ttft_s": t,
                "speedup": cold_t / t,
                "agreement": agree,
                "recomputed": r.last["recomputed"],
                "hits": r.last["reused"],
            }
        rows.append(row)
        cells = " ".join(f"{1000 * row['reuse'][k]['ttft_s']:>8.1f}ms {row['reuse'][k]['speedup']:>5.2f}x" for k in ks)
        agree = " ".join(f"{row['reuse'][k]['agreement']:.2f}" for k in ks)
        print(f"{n:>6} {row['tokens']:>7} {1000 * cold_t:>8.1f}ms {cells}   {agree}")
    trained = trained_accuracy(args.trained_n, ks, device) if args.trained_n else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": where, "model": {**size, "dtype": str(model.dtype)}}
    (out / "reuse.json").write_text(json.dumps({"rows": rows, "ks": ks, "trained": trained, **meta}, indent=2) + "\n")
    plot(rows, ks, out / "reuse.png")
    print(f"wrote {out / 'reuse.json'} and {out / 'reuse.png'}")
    return 0


def trained_accuracy(n: int, ks: list[str], device, tasks=("needle", "count", "describe")) -> dict:
    """Accuracy of the embedded model on videos whose frames were stored, then moved: cold and linked per k."""
    import numpy as np

    from ..evaluation.embedded_model import batch_inputs, load_embedded
    from ..evaluation.tasks import Example, make_example, score

    model, processor = load_embedded(device=device)

    rng = np.random.default_rng(4 * 10**6)  # held out: training and the quality benchmark draw elsewhere
    result = {"videos_per_task": n, "frames": 8, "tasks": {}}
    print(f"\nembedded model, 8-frame videos stored, then asked again with frames rotated; accuracy over {n} each")
    print(f"{'task':<10} {'cold':>6} " + " ".join(f"{'k=' + k:>7}" for k in ks))
    for task in tasks:
        right = {"cold": 0.0, **{k: 0.0 for k in ks}}
        for _ in range(n):
            ex = make_example(task, 8, rng)
            shift = int(rng.integers(1, 8))
            moved = Example(task, ex.frames[shift:] + ex.frames[:shift], ex.question, ex.answer, {})
            store = ImageKVStore(max_bytes=1 << 28)
            with vlcache.reuse(model, store), torch.inference_mode():  # stores every frame
                model.generate(**batch_inputs(processor, [ex], device=device), max_new_tokens=1, do_sample=False)
            inputs = batch_inputs(processor, [moved], device=device)
            m, width = inputs["input_ids"].shape[1], len(ex.answer) + 1

            def answer(inputs=inputs, m=m, width=width):
                with torch.inference_mode():
                    out = model.generate(**inputs, max_new_tokens=width, min_new_tokens=width, do_sample=False)
                return processor.decode(out[0, m:], skip_special_tokens=True)

            right["cold"] += score(task, answer(), moved.answer)
            for k in ks:
                with vlcache.reuse(model, store, **({"recompute": "full"} if k == "full" else {"k": int(k)})):
                    right[k] += score(task, answer(), moved.answer)
        acc = {key: v / n for key, v in right.items()}
        result["tasks"][task] = acc
        print(f"{task:<10} {acc['cold']:>6.2f} " + " ".join(f"{acc[k]:>7.2f}" for k in ks))
    return result


def plot(rows, ks, path):
    with figure_row(path, 2, (10, 3.6)) as ax:
        n = [r["images"] for r in rows]
        ax[0].plot(n, [1000 * r["cold_s"] for r in rows], "k-o", label="cold prefill")
        for k in ks:
            ax[0].plot(n, [1000 * r["reuse"][k]["ttft_s"] for r in rows], "-o", ms=3, label=f"reuse, k={k}")
            ax[1].plot(n, [r["reuse"][k]["agreement"] for r in rows], "-o", ms=3, label=f"k={k}")
        ax[0].set_ylabel("time to first token (ms)")
        ax[1].set_ylabel("first tokens equal to the cold run")
        for a in ax:
            a.set_xlabel("images seen before")
            a.set_xscale("log", base=2)
            a.grid(alpha=0.3)
            a.legend(fontsize=7)


if __name__ == "__main__":
    sys.exit(main())
