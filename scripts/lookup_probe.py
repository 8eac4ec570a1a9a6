"""How well could one attention head find the keyed lookup's object? The best linear query at each stage of a model.

    python scripts/lookup_probe.py                      # the embedded model, 2,000 eight-frame lookups
    python scripts/lookup_probe.py --model /tmp/m --n 500

The keyed lookup ("find r?" -> the frame of the red object) asks the answer position to pick, by dot product, the
one vision token of the named colour among 2 to 4 coloured objects and 124 or more background tokens. Whatever the
language model does, a head can only do that if the keys it reads separate the colours linearly. This fits, for
each colour, the query vector that best picks its object by softmax over all the video's vision tokens (Adam on 80%
of the videos) and reports how often the arg-max is the right token on the other 20%, at every stage from the
pixels to the input of the last language-model layer. Features that enter attention through RMSNorm are RMS-
normalised first (its learned scale is absorbed in the query). A stage below the task's target accuracy caps any
model that reads it with one head: the lookup cannot be learned there, only around it.
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
from vlcache.apps.evaluation.tasks import COLOR_KEYS, GRID, PATCH, SIZE, make_example  # noqa: E402

TOKENS = GRID * GRID


def stages(model, inputs: dict, frames: int) -> dict[str, tuple[torch.Tensor, bool]]:
    """name -> ([B, frames * TOKENS, d] features of the vision tokens, whether attention sees them RMS-normalised)."""
    B = inputs["input_ids"].shape[0]
    pix = inputs["pixel_values"].view(B, frames, 3, GRID, PATCH, GRID, PATCH)
    out = {"pixels": (pix.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, frames * TOKENS, -1), False)}
    tower = model.model.vision_tower
    seen = {}
    hook = tower.embeddings.register_forward_hook(lambda m, a, o: seen.setdefault("embed", o))
    try:
        vision = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    finally:
        hook.remove()

    def tokens(x):  # drop CLIP's class token, as Llava's "default" feature strategy does
        return x[:, 1:].reshape(B, frames * TOKENS, -1)

    out["patch embedding"] = (tokens(seen["embed"]), False)
    for i, h in enumerate(vision):
        out[f"vision layer {i} output" if i else "vision pre-layernorm"] = (tokens(h), False)
    hidden = model(**inputs, output_hidden_states=True).hidden_states
    vis = inputs["input_ids"] == model.config.image_token_id
    for i, h in enumerate(hidden[:-1]):  # the last is after the final norm: no attention reads it
        if i == 0:  # the projector's output as it is, then as the first layer's attention sees it
            out["projector output"] = (h[vis].view(B, frames * TOKENS, -1), False)
        out[f"LM layer {i} input"] = (h[vis].view(B, frames * TOKENS, -1), True)
    return out


def best_query(z: torch.Tensor, key: torch.Tensor, target: torch.Tensor, steps: int) -> torch.Tensor:
    """Held-out arg-max predictions of the per-colour query fitted on the first 80% of the rows."""
    z = torch.cat([z, torch.ones_like(z[..., :1])], -1)  # a constant feature, as a bias in the query's space
    cut = int(0.8 * len(z))
    w = torch.zeros(len(COLOR_KEYS), z.shape[-1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.01)
    for _ in range(steps):
        logits = torch.einsum("bnd,bd->bn", z[:cut], w[key[:cut]])
        loss = torch.nn.functional.cross_entropy(logits, target[:cut])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return torch.einsum("bnd,bd->bn", z[cut:], w[key[cut:]]).argmax(-1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a saved embedded-model directory (default: the shipped one)")
    p.add_argument("--n", type=int, default=2000, help="lookup videos (80%% fit the queries, 20%% judge them)")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--steps", type=int, default=800, help="Adam steps per stage")
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.n < 10:
        raise SystemExit("--n must be at least 10 (a fifth of them judge the queries)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, processor = load_embedded(args.model)
    rng = np.random.default_rng(args.seed)
    examples = [make_example("lookup", args.frames, rng) for _ in range(args.n)]
    feats: dict[str, list] = collections.defaultdict(list)
    with torch.no_grad():
        for lo in range(0, args.n, 250):
            chunk = examples[lo : lo + 250]
            for name, (z, normed) in stages(model, batch_inputs(processor, chunk), args.frames).items():
                z = z.float()
                feats[name].append(z / z.pow(2).mean(-1, keepdim=True).sqrt() if normed else z)
    (frame_patch,) = zip(*[e.answer_patches() for e in examples])
    target = torch.tensor([f * TOKENS + patch for f, patch in frame_patch])
    key = torch.tensor([COLOR_KEYS.index(next(iter(e.objects.values()))[1]) for e in examples])
    held = examples[int(0.8 * args.n) :]
    print(f"best linear query, {args.n} lookups of {args.frames} frames of {SIZE}x{SIZE} pixels, 20% held out")
    print(f"{'stage':24s} {'right token':>11s}  misses by named colour")
    for name, parts in feats.items():
        pred = best_query(torch.cat(parts), key, target, args.steps)
        right = pred == target[int(0.8 * args.n) :]
        misses = collections.Counter(e.question[5] for e, ok in zip(held, right.tolist()) if not ok)
        print(f"{name:24s} {right.float().mean():11.3f}  {' '.join(f'{k}:{v}' for k, v in misses.most_common())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
