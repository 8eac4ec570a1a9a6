"""Pictures of what a policy kept: per image or video frame, which of its patches survived."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from .modality import Layout, Modality


def kept_fraction(
    layout: Layout, kept_positions: dict[int, torch.Tensor], layer: int | None = None, row: int = 0
) -> np.ndarray:
    """[n] for each prompt position, the share of (layer, KV head) caches that kept it; one layer if given."""
    layers = [layer] if layer is not None else sorted(kept_positions)
    n = layout.length
    total = np.zeros(n)
    count = 0
    for li in layers:
        pos = kept_positions[li][row]  # [Hk, K]
        for head in pos:
            p = head[(head >= 0) & (head < n)].numpy()
            total[p] += 1
            count += 1
    return total / max(count, 1)


def _grid(tokens: int) -> tuple[int, int]:
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else (1, tokens)


def heatmap(
    frames: list[Image.Image], layout: Layout, fraction: np.ndarray, row: int = 0, cell: int = 96
) -> Image.Image:
    """One tile per image/frame: the frame with its patches shaded by the share kept (dark = evicted everywhere)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = [s for s in layout.samples[row].spans if s.frame != -1 or s.modality == Modality.IMAGE]
    cols = min(8, max(1, len(spans)))
    rows = math.ceil(len(spans) / cols) if spans else 1
    fig, axes = plt.subplots(rows, cols, figsize=(cols * cell / 72, rows * (cell + 18) / 72), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, span in enumerate(spans):
        ax = axes.flat[i]
        values = fraction[span.start : span.end]
        gh, gw = _grid(len(values))
        frame = frames[i] if i < len(frames) else None
        if frame is not None and gh > 1:
            ax.imshow(frame.convert("RGB").resize((cell, cell), Image.NEAREST), extent=(0, gw, gh, 0))
            ax.imshow(values.reshape(gh, gw), cmap="gray", vmin=0, vmax=1, alpha=0.6, extent=(0, gw, gh, 0))
        else:
            ax.imshow(values.reshape(gh, gw), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        label = f"frame {span.frame}" if span.frame >= 0 else f"image {span.item}"
        ax.set_title(f"{label}: {values.mean():.0%} kept", fontsize=7)
    fig.tight_layout(pad=0.6)
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    plt.close(fig)
    return image
