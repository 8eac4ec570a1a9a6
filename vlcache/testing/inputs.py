"""Model inputs built by hand for the tiny models: exact token layouts, images and videos, left-padded batches.

Video processors need torchvision, which this project cannot install, so videos are always built here. A prompt
is a list of segments: a `str` is text (one token per character), `IMAGE` is one image and `Video(frames)` one
video. `make_inputs` returns what the model's `forward`/`generate` takes, plus the expected layout for tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..modality import Modality, Span
from .models import BOI, EOI, IMG, VEND, VID, VSTART
from .processors import CHARS

IMAGE = "<image>"


@dataclass(frozen=True)
class Video:
    frames: int


def text_ids(s: str) -> list[int]:
    return [4 + CHARS.index(c) for c in s]


def _side(model, qwen_grid: int = 8) -> tuple[int, int]:
    vc = model.config.vision_config
    if not hasattr(vc, "image_size"):  # Qwen-VL takes any resolution: the grid is the caller's choice
        return qwen_grid * vc.patch_size, vc.patch_size
    size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
    patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
    return size, patch


def _count_image_tokens(model, **kw) -> int:
    with torch.no_grad():
        out = model.model.get_image_features(**kw)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        return sum(f.shape[0] for f in feats)
    return feats.reshape(-1, feats.shape[-1]).shape[0]


class _Sample:
    """Accumulates one prompt's ids, pixel tensors and expected spans."""

    def __init__(self):
        self.ids: list[int] = [1]  # bos
        self.spans: list[Span] = []
        self.markers: list[int] = []
        self.images: list[torch.Tensor] = []
        self.image_sizes: list[list[int]] = []
        self.image_thw: list[list[int]] = []
        self.videos: list[torch.Tensor] = []
        self.video_thw: list[list[int]] = []
        self.n_images = 0
        self.n_videos = 0

    def marker(self, tok):
        self.markers.append(len(self.ids))
        self.ids.append(tok)

    def vision(self, tok, n, modality, item, frame=-1):
        self.spans.append(Span(len(self.ids), len(self.ids) + n, modality, item, frame))
        self.ids.extend([tok] * n)


def _add_image(s: _Sample, family: str, model, gen: torch.Generator, qwen_grid: int):
    size, patch = _side(model, qwen_grid)
    grid = size // patch
    item = s.n_images
    s.n_images += 1
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        s.marker(VSTART)
        s.vision(IMG, grid * grid // 4, Modality.IMAGE, item)
        s.marker(VEND)
        s.images.append(torch.randn(grid * grid, 3 * 2 * patch * patch, generator=gen))
        s.image_thw.append([1, grid, grid])
    elif family == "llava":
        s.vision(IMG, model.config.image_seq_length, Modality.IMAGE, item)
        s.images.append(torch.randn(3, size, size, generator=gen))
    elif family in ("llava_next", "llava_onevision", "llava_next_video"):
        views = 1 if family == "llava_next_video" else 2  # base view + one high-res tile
        pv = torch.randn(1, views, 3, size, size, generator=gen)
        n = _count_image_tokens(model, pixel_values=pv, image_sizes=torch.tensor([[size, size]]))
        s.vision(IMG, n, Modality.IMAGE, item)
        s.images.append(pv[0])
        s.image_sizes.append([size, size])
    elif family in ("idefics3", "smolvlm"):
        s.marker(BOI)
        s.marker(EOI)  # stands for <global-img>
        s.vision(IMG, grid * grid // 4, Modality.IMAGE, item)
        s.marker(BOI)
        s.images.append(torch.randn(3, size, size, generator=gen))
    elif family == "internvl":
        s.marker(BOI)
        s.vision(IMG, grid * grid // 4, Modality.IMAGE, item)
        s.marker(EOI)
        s.images.append(torch.randn(3, size, size, generator=gen))
    elif family == "gemma3":
        s.marker(BOI)
        s.vision(IMG, model.config.mm_tokens_per_image, Modality.IMAGE, item)
        s.marker(EOI)
        s.images.append(torch.randn(3, size, size, generator=gen))
    else:
        raise ValueError(f"no hand-built images for {family!r}")


def _add_video(s: _Sample, family: str, model, frames: int, gen: torch.Generator, qwen_grid: int):
    size, patch = _side(model, qwen_grid)
    grid = size // patch
    item = s.n_videos
    s.n_videos += 1
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        if frames % 2:
            raise ValueError("Qwen-VL videos take an even number of frames (temporal patch of 2)")
        t, per = frames // 2, grid * grid // 4
        if family == "qwen3_vl":
            # Qwen3-VL wraps every temporal patch in its own markers, after a text timestamp
            for f in range(t):
                s.ids.extend(text_ids(str(f % 10)))
                s.marker(VSTART)
                s.vision(VID, per, Modality.VIDEO, item, f)
                s.marker(VEND)
        else:
            s.marker(VSTART)
            for f in range(t):
                s.vision(VID, per, Modality.VIDEO, item, f)
            s.marker(VEND)
        s.videos.append(torch.randn(t * grid * grid, 3 * 2 * patch * patch, generator=gen))
        s.video_thw.append([t, grid, grid])
    elif family == "llava_onevision":
        per = math.ceil(grid / 2) ** 2
        for f in range(frames):
            s.vision(VID, per, Modality.VIDEO, item, f)
        s.vision(VID, 1, Modality.VIDEO, item, -1)  # the newline closing the video
        s.videos.append(torch.randn(frames, 3, size, size, generator=gen))
    elif family == "llava_next_video":
        per = (grid // model.config.spatial_pool_stride) ** 2
        for f in range(frames):
            s.vision(VID, per, Modality.VIDEO, item, f)
        s.videos.append(torch.randn(frames, 3, size, size, generator=gen))
    else:
        raise ValueError(f"{family!r} takes no video input")


@dataclass
class Example:
    inputs: dict
    spans: list[list[Span]]  # expected spans per row (positions include the left padding)
    markers: list[list[int]]
    pad: list[int]


def make_inputs(model, segments_per_row, seed: int = 0, question: str | None = None, qwen_grid: int = 8) -> Example:
    """Inputs for `model` from prompt segments; `segments_per_row` is one prompt (a list) or a list of prompts.
    `qwen_grid`: patches per side of a Qwen-VL image or frame (the other families' size is fixed by the config).
    Row i's pixels come from seed + i, so `make_inputs(model, [rows[i]], seed=seed + i)` rebuilds it alone."""
    if segments_per_row and not isinstance(segments_per_row[0], list):
        segments_per_row = [segments_per_row]
    family = model.config.model_type
    rows = []
    for i, segs in enumerate(segments_per_row):
        gen = torch.Generator().manual_seed(seed + i)  # row i alone, with seed + i, gets the same pixels
        s = _Sample()
        for seg in segs:
            if seg is IMAGE or seg == IMAGE:
                _add_image(s, family, model, gen, qwen_grid)
            elif isinstance(seg, Video):
                _add_video(s, family, model, seg.frames, gen, qwen_grid)
            elif isinstance(seg, str):
                s.ids.extend(text_ids(seg))
            else:
                raise TypeError(f"unknown prompt segment {seg!r}")
        if question:
            s.ids.extend(text_ids(question))
        rows.append(s)

    n = max(len(r.ids) for r in rows)
    pads = [n - len(r.ids) for r in rows]
    ids = torch.tensor([[0] * p + r.ids for p, r in zip(pads, rows)])
    mask = torch.tensor([[0] * p + [1] * len(r.ids) for p, r in zip(pads, rows)])
    inputs = {"input_ids": ids, "attention_mask": mask}
    spans = [
        [Span(sp.start + p, sp.end + p, sp.modality, sp.item, sp.frame) for sp in r.spans] for p, r in zip(pads, rows)
    ]
    markers = [[m + p for m in r.markers] for p, r in zip(pads, rows)]

    images = [im for r in rows for im in r.images]
    videos = [v for r in rows for v in r.videos]
    if images:
        if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            inputs["pixel_values"] = torch.cat(images)
            inputs["image_grid_thw"] = torch.tensor([thw for r in rows for thw in r.image_thw])
        elif family in ("idefics3", "smolvlm"):
            most = max(len(r.images) for r in rows)
            size = images[0].shape[-1]
            pv = torch.zeros(len(rows), most, 3, size, size)
            pam = torch.zeros(len(rows), most, size, size, dtype=torch.bool)
            for b, r in enumerate(rows):
                for i, im in enumerate(r.images):
                    pv[b, i], pam[b, i] = im, True
            inputs["pixel_values"], inputs["pixel_attention_mask"] = pv, pam
        elif family in ("llava_next", "llava_onevision", "llava_next_video"):
            inputs["pixel_values"] = torch.stack(images)
            inputs["image_sizes"] = torch.tensor([hw for r in rows for hw in r.image_sizes])
        else:
            inputs["pixel_values"] = torch.stack(images)
    if videos:
        if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
            inputs["pixel_values_videos"] = torch.cat(videos)
            inputs["video_grid_thw"] = torch.tensor([thw for r in rows for thw in r.video_thw])
            if family == "qwen2_5_vl":
                inputs["second_per_grid_ts"] = torch.ones(len(videos))
        else:
            inputs["pixel_values_videos"] = torch.stack(videos)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        inputs["mm_token_type_ids"] = (ids == IMG).int() + 2 * (ids == VID).int()
    if family == "gemma3":
        inputs["token_type_ids"] = (ids == IMG).long()
    return Example(inputs, spans, markers, pads)
