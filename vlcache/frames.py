"""Procedurally generated videos: coloured shapes moving over a textured background, seeded and reproducible.

Used by the main job, the sample videos of the captioning script and the demo; no download needed.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (150, 60, 190),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 200, 210),
}


def synthetic_video(frames: int = 8, size: int = 64, shapes: int = 2, seed: int = 0) -> list[Image.Image]:
    """`frames` RGB frames of `size` x `size`: a noisy background and `shapes` coloured squares/discs moving
    in straight lines, bouncing off the edges."""
    rng = np.random.default_rng(seed)
    background = rng.integers(40, 90, size=(size, size, 3), dtype=np.uint8)
    names = rng.choice(list(PALETTE), size=shapes, replace=False)
    r = max(3, size // 8)
    pos = rng.uniform(r, size - r, size=(shapes, 2))
    vel = rng.uniform(-size / 10, size / 10, size=(shapes, 2))
    kinds = rng.integers(0, 2, size=shapes)
    out = []
    for _ in range(frames):
        img = Image.fromarray(background.copy())
        draw = ImageDraw.Draw(img)
        for (x, y), name, kind in zip(pos, names, kinds):
            box = (x - r, y - r, x + r, y + r)
            (draw.rectangle if kind == 0 else draw.ellipse)(box, fill=PALETTE[name])
        out.append(img)
        pos = pos + vel
        for axis in range(2):  # bounce
            low, high = pos[:, axis] < r, pos[:, axis] > size - r
            vel[low | high, axis] *= -1
            pos[:, axis] = np.clip(pos[:, axis], r, size - r)
    return out
