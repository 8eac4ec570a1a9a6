"""Pictures of what a policy kept: per image or video frame, which of its patches survived; and how a policy's answer
agrees with the full cache's over a range of budgets."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..modality import Layout, Modality

CELL = 192  # px of a frame's shorter side in the picture: patches of a 4 x 4 grid are 48 px, easy to see
COLUMNS = 4  # frames per row: 8 frames at 192 px fit a 1280-px page in two rows
OUTLINE = (255, 225, 0)  # kept patches: yellow, over a black halo, so it reads on dark and light frames alike
TITLE_PX = 26  # room above each frame for its title, so no page element over the picture's edge hides one
GAP = 12  # px between tiles and around them


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


def patch_grid(tokens: int, aspect: float = 1.0) -> tuple[int, int]:
    """(rows, columns) of a frame's `tokens` patches: the factor pair closest to the frame's width / height. A
    model whose frame tokens do not tile it (a prime count, extra newline tokens) gets a close approximation."""
    pairs = [(r, tokens // r) for r in range(1, tokens + 1) if tokens % r == 0]
    return min(pairs, key=lambda rc: abs(math.log((rc[1] / rc[0]) / aspect)))


def titles(layout: Layout, fraction: np.ndarray, row: int = 0, label: str = "image") -> list[str]:
    """One title per image or video frame of the prompt: "<label> N: K% kept". Frames of a video span are always
    "frame N"; images are `label` N, so the demo names images it read from a video "frame" too."""
    out = []
    for span in _spans(layout, row):
        name = f"frame {span.frame}" if span.frame >= 0 else f"{label} {span.item}"
        out.append(f"{name}: {fraction[span.start : span.end].mean():.0%} kept")
    return out


def _spans(layout: Layout, row: int):
    return [s for s in layout.samples[row].spans if s.frame != -1 or s.modality == Modality.IMAGE]


def _tile_size(frame: Image.Image | None, cell: int) -> tuple[int, int]:
    if frame is None:
        return cell, cell
    w, h = frame.size
    scale = cell / min(w, h)  # the shorter side gets `cell` px
    return max(cell, round(w * scale)), max(cell, round(h * scale))


def heatmap(
    frames: list[Image.Image],
    layout: Layout,
    fraction: np.ndarray,
    row: int = 0,
    cell: int = CELL,
    columns: int = COLUMNS,
    label: str = "image",
) -> Image.Image:
    """One tile per image or video frame: the frame itself (nearest-neighbour scaled, its shorter side `cell` px),
    with every patch that some (layer, KV head) cache kept outlined; the outline is thicker the larger that share
    (`fraction`, [n] per prompt position, from `kept_fraction`). Evicted patches are left bare. Tiles carry
    `titles(...)`: pass `label="frame"` for frames read from a video."""
    spans = _spans(layout, row)
    names = titles(layout, fraction, row, label)
    tw, th = _tile_size(frames[0] if frames else None, cell)
    cols = min(columns, max(1, len(spans)))
    rows = max(1, math.ceil(len(spans) / cols))
    canvas = Image.new("RGB", (cols * tw + (cols + 1) * GAP, rows * (th + TITLE_PX) + (rows + 1) * GAP), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=16)
    for i, span in enumerate(spans):
        x0 = GAP + (i % cols) * (tw + GAP)
        y0 = GAP + (i // cols) * (th + TITLE_PX + GAP)
        values = fraction[span.start : span.end]
        draw.text((x0, y0 + 2), names[i], fill="black", font=font)
        y0 += TITLE_PX
        frame = frames[i] if i < len(frames) else None
        if frame is not None:
            canvas.paste(frame.convert("RGB").resize((tw, th), Image.NEAREST), (x0, y0))
        else:  # nothing to show under the outlines: a neutral tile
            draw.rectangle((x0, y0, x0 + tw - 1, y0 + th - 1), fill=(90, 90, 90))
        gh, gw = patch_grid(len(values), tw / th)
        pw, ph = tw / gw, th / gh
        widest = max(2, round(min(pw, ph) / 10))  # a patch of 48 px gets up to 5 px of outline
        for k, v in enumerate(values):
            if v <= 0:
                continue
            r, c = divmod(k, gw)
            box = (x0 + c * pw, y0 + r * ph, x0 + (c + 1) * pw - 1, y0 + (r + 1) * ph - 1)
            width = max(1, round(widest * v))
            draw.rectangle(box, outline="black", width=width + 2)  # the halo
            inner = (box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1)
            draw.rectangle(inner, outline=OUTLINE, width=width)
    return canvas


def agreement_plot(
    budgets: list[float], agreement: list[float], title: str, chosen: float | None = None
) -> Image.Image:
    """A small line plot: the share of the answer's tokens equal to the full cache's, per budget (log axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.0), dpi=100)
    ax.plot(budgets, agreement, marker="o", color="tab:blue")
    for b, a in zip(budgets, agreement):
        ax.annotate(f"{a:.0%}", (b, a), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
    if chosen is not None:
        ax.axvline(chosen, color="tab:orange", linestyle="--", linewidth=1, label=f"chosen: {chosen:.0%}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [f"{b:.0%}" for b in budgets])
    ax.minorticks_off()
    ax.set_ylim(-0.05, 1.15)
    ax.set_xlabel("budget (share kept)")
    ax.set_ylabel("agreement with full cache")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    image = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    plt.close(fig)
    return image
