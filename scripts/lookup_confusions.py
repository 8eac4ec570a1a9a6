"""Which keyed lookups does a model get wrong? Accuracy by the colour named and by the other colours in the video.

    python scripts/lookup_confusions.py                        # the embedded model, 800 eight-frame lookups
    python scripts/lookup_confusions.py --model .ckpt/attend/run4 --n 1600

The keyed lookup ("find r?" -> the frame of the red object) is learned one colour at a time: a model near 0.9 answers
most colours every time and a few rarely, and mostly when a particular other colour is in the video too. This prints
the accuracy for each named colour, and for each (named, also present) pair, from greedy generation on held-out
videos (seeds no training batch drew). The weak pairs are what `train_embedded.py --hard-colors` trains on.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlcache.apps.evaluation.embedded_model import batch_inputs, load_embedded  # noqa: E402
from vlcache.apps.evaluation.tasks import COLOR_KEYS, COLORS, GRID, PATCH, make_example, score  # noqa: E402

SEED = 7 * 10**6  # far from the training seeds and from the quality benchmark's held-out ones


def colours_shown(example) -> set[str]:
    """The colours of the objects in the video, read from its frames (a lookup example keeps only the named one)."""
    palette = np.array(list(COLORS.values()), dtype=float)
    shown = set()
    for image in example.frames:
        pix = np.asarray(image, dtype=float).reshape(GRID, PATCH, GRID, PATCH, 3).mean((1, 3)).reshape(-1, 3)
        bright = pix.max(-1) > 150  # background noise stays below 70, objects are at least 200 in one channel
        for rgb in pix[bright]:
            shown.add(COLOR_KEYS[int(np.abs(palette - rgb).sum(-1).argmin())])
    return shown


def confusions(model, processor, n: int, frames: int, batch: int = 100) -> tuple[float, dict, dict]:
    """(accuracy, {named: accuracy}, {(named, other present): (accuracy, count)}) over `n` held-out lookups."""
    rng = np.random.default_rng(SEED + frames)
    examples = [make_example("lookup", frames, rng) for _ in range(n)]
    by_named, by_pair = collections.defaultdict(list), collections.defaultdict(list)
    for lo in range(0, n, batch):
        chunk = examples[lo : lo + batch]
        inputs = batch_inputs(processor, chunk, device=model.device)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for text, example in zip(texts, chunk):
            named = example.question.split()[1][0]
            right = score("lookup", text, example.answer)
            by_named[named].append(right)
            for other in colours_shown(example) - {named}:
                by_pair[named, other].append(right)
    named_acc = {k: float(np.mean(v)) for k, v in by_named.items()}
    pair_acc = {k: (float(np.mean(v)), len(v)) for k, v in by_pair.items()}
    return float(np.mean([r for v in by_named.values() for r in v])), named_acc, pair_acc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a trained model directory (default: the shipped one)")
    p.add_argument("--n", type=int, default=800)
    p.add_argument("--frames", type=int, default=8)
    args = p.parse_args(argv)
    if args.n < 1 or not 2 <= args.frames <= 10:
        p.error("--n must be >= 1 and --frames 2 to 10 (the lookup answers with one digit)")
    torch.set_num_threads(2)
    model, processor = load_embedded(args.model)
    overall, named_acc, pair_acc = confusions(model, processor, args.n, args.frames)
    total = np.mean([pair_acc.get((k, o), (0, 0))[1] for k in COLOR_KEYS for o in COLOR_KEYS if k != o])
    print(f"lookup accuracy by the colour named (rows) and another colour in the video (columns), {args.n} videos")
    print(f"of {args.frames} frames, about {total:.0f} videos a pair\n")
    print("| named | all | " + " | ".join(COLOR_KEYS) + " |")
    print("|---" * (len(COLOR_KEYS) + 2) + "|")
    for k in COLOR_KEYS:
        cells = [f"{pair_acc[k, o][0]:.2f}" if (k, o) in pair_acc else "-" for o in COLOR_KEYS]
        print(f"| {k} | {named_acc.get(k, float('nan')):.2f} | " + " | ".join(cells) + " |")
    print(f"\nall lookups: {overall:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
