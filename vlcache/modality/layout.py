"""The layout of a prompt: which positions are text, which belong to which image or video frame.

A `Layout` is built once per prefill from `input_ids` (after the processor expanded the vision placeholders)
and is all a policy knows about modality. It is frozen: policies read it, never change it.

Positions are indices into the (left-padded) prompt as the model sees it, so they line up with the KV cache
slots written by the prefill.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from functools import cached_property

import torch


class Modality(enum.IntEnum):
    TEXT = 0
    IMAGE = 1
    VIDEO = 2


@dataclass(frozen=True, slots=True)
class Span:
    """A contiguous run of vision tokens: one image, or one frame (temporal patch) of a video.

    `item` counts images (or videos) within the sample, from 0. `frame` is the frame index inside a video, and -1
    for images and for video tokens that belong to no single frame (LLaVA-OneVision's end-of-video newline).
    """

    start: int
    end: int  # exclusive
    modality: Modality
    item: int
    frame: int = -1

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SampleLayout:
    """One row of the batch, as plain Python (cheap to print and to compare in tests)."""

    length: int  # padded prompt length n
    pad: int  # number of padding positions at the left
    spans: tuple[Span, ...]
    markers: tuple[int, ...]  # positions of vision marker tokens (<|vision_start|>, <start_of_image>, ...): text
    question_start: int  # first position after the last vision token; == length when there is none

    @property
    def images(self) -> list[list[Span]]:
        return _group(self.spans, Modality.IMAGE)

    @property
    def videos(self) -> list[list[Span]]:
        return _group(self.spans, Modality.VIDEO)

    @property
    def text_spans(self) -> list[tuple[int, int]]:
        """Maximal runs of real (non-pad) text positions, markers included."""
        out, start = [], None
        vision = set()
        for s in self.spans:
            vision.update(range(s.start, s.end))
        for p in range(self.pad, self.length + 1):
            is_text = p < self.length and p not in vision
            if is_text and start is None:
                start = p
            elif not is_text and start is not None:
                out.append((start, p))
                start = None
        return out


def _group(spans, modality):
    groups: dict[int, list[Span]] = {}
    for s in spans:
        if s.modality == modality:
            groups.setdefault(s.item, []).append(s)
    return [groups[k] for k in sorted(groups)]


@dataclass(frozen=True)
class Layout:
    """Modality map of a batch of prompts, as tensors ([B, n]) for the policies plus per-sample spans.

    - `modality`: [B, n] int8, `Modality` values; padding positions are TEXT and `valid` is False there.
    - `valid`: [B, n] bool, False at padding.
    - `marker`: [B, n] bool, vision marker tokens (counted as text, as in EffiVLM-Bench).
    - `question_start`: [B] long, the first row after the last vision token (VL-Cache's post-vision rows).
    """

    family: str
    modality: torch.Tensor
    valid: torch.Tensor
    marker: torch.Tensor
    question_start: torch.Tensor
    samples: tuple[SampleLayout, ...]
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.modality.shape[0]

    @property
    def length(self) -> int:
        return self.modality.shape[1]

    @cached_property
    def vision(self) -> torch.Tensor:
        """[B, n] bool: image or video token."""
        return self.modality != Modality.TEXT

    @cached_property
    def text(self) -> torch.Tensor:
        """[B, n] bool: real text token (markers included, padding excluded)."""
        return (self.modality == Modality.TEXT) & self.valid

    @cached_property
    def question(self) -> torch.Tensor:
        """[B, n] bool: rows after the last vision token (empty for a prompt without vision)."""
        pos = torch.arange(self.length, device=self.modality.device)
        return (pos[None, :] >= self.question_start[:, None]) & self.valid

    @cached_property
    def span_index(self) -> torch.Tensor:
        """[B, n] long: index into `samples[b].spans` of the span holding each position, -1 outside spans."""
        out = torch.full(self.modality.shape, -1, dtype=torch.long)
        for b, s in enumerate(self.samples):
            for i, span in enumerate(s.spans):
                out[b, span.start : span.end] = i
        return out.to(self.modality.device)

    @property
    def has_vision(self) -> bool:
        return bool(self.vision.any())

    def counts(self) -> dict[str, int]:
        """Real tokens per modality over the whole batch."""
        v = self.valid
        return {
            "text": int(((self.modality == Modality.TEXT) & v).sum()),
            "image": int(((self.modality == Modality.IMAGE) & v).sum()),
            "video": int(((self.modality == Modality.VIDEO) & v).sum()),
        }

    def to(self, device) -> Layout:
        return Layout(
            self.family,
            self.modality.to(device),
            self.valid.to(device),
            self.marker.to(device),
            self.question_start.to(device),
            self.samples,
        )

    def select(self, keep: torch.Tensor, valid: torch.Tensor | None = None) -> Layout:
        """The layout of the sequence that keeps positions `keep` [B, m] (ascending) of every row: what the language
        model sees after vision tokens were dropped before it (temporal merging). `valid` [B, m] marks kept slots
        that hold no token (a row that keeps fewer than m fills up with positions it dropped); default all True
        where the position was valid. Spans shrink to their kept tokens (a frame dropped whole disappears); the
        question starts after the last kept vision token."""
        keep = keep.to(self.modality.device)
        B, m = keep.shape
        ok = self.valid.gather(1, keep)
        if valid is not None:
            ok = ok & valid.to(ok.device)
        modality = self.modality.gather(1, keep).masked_fill(~ok, int(Modality.TEXT))
        marker = self.marker.gather(1, keep) & ok
        rows = keep.cpu().tolist()
        ok_rows = ok.cpu().tolist()
        samples, qstart = [], torch.empty(B, dtype=torch.long)
        for b, sample in enumerate(self.samples):
            new_index = {p: i for i, (p, good) in enumerate(zip(rows[b], ok_rows[b])) if good}
            spans = []
            for span in sample.spans:
                kept = [new_index[p] for p in range(span.start, span.end) if p in new_index]
                for start, end in _runs(kept):
                    spans.append(Span(start, end, span.modality, span.item, span.frame))
            pad = 0
            while pad < m and not ok_rows[b][pad]:
                pad += 1
            q = max((s.end for s in spans), default=m)
            qstart[b] = q
            samples.append(
                SampleLayout(
                    length=m,
                    pad=pad,
                    spans=tuple(spans),
                    markers=tuple(i for i, mk in enumerate(marker[b].tolist()) if mk),
                    question_start=q,
                )
            )
        return Layout(self.family, modality, ok, marker, qstart.to(self.modality.device), tuple(samples))

    def describe(self, b: int = 0) -> str:
        """A one-line picture of sample b: T text, I image, V video, M marker, . padding."""
        mod, valid, marker = self.modality[b].tolist(), self.valid[b].tolist(), self.marker[b].tolist()
        chars = []
        for m, ok, mk in zip(mod, valid, marker):
            chars.append("." if not ok else "M" if mk else "TIV"[m])
        return "".join(chars)


def build_layout(
    input_ids: torch.Tensor,
    *,
    family: str,
    image_token: int | None,
    video_token: int | None,
    markers: frozenset[int] = frozenset(),
    attention_mask: torch.Tensor | None = None,
    image_chunks: list[int] | None = None,
    video_chunks: list[list[int]] | None = None,
) -> Layout:
    """Build the layout of a batch from its (processor-expanded) `input_ids` [B, n].

    `image_chunks`: tokens per image, in prompt order across the batch (row 0's images first). `video_chunks`: per
    video, tokens per frame, with a trailing entry for tokens that belong to no frame given as a negative count
    (LLaVA-OneVision's end-of-video newline is `[-1]`). When chunk sizes are missing or do not add up to the
    tokens present, each maximal run of vision tokens becomes one span (right whenever images are separated by
    text or markers, which every family's processor does).
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    B, n = input_ids.shape
    if n == 0:
        raise ValueError("empty prompt: input_ids has length 0")
    ids = input_ids.detach().cpu()
    if attention_mask is None:
        valid = torch.ones(B, n, dtype=torch.bool)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        valid = attention_mask.detach().cpu().bool()
    modality = torch.zeros(B, n, dtype=torch.int8)
    if image_token is not None:
        modality[(ids == image_token) & valid] = Modality.IMAGE
    if video_token is not None:
        modality[(ids == video_token) & valid] = Modality.VIDEO
    marker = torch.zeros(B, n, dtype=torch.bool)
    for t in markers:
        marker |= ids == t
    marker &= valid

    spans: list[list[Span]] = [[] for _ in range(B)]
    for mod, chunks in (
        (Modality.IMAGE, _flat_image_chunks(image_chunks)),
        (Modality.VIDEO, _flat_video_chunks(video_chunks)),
    ):
        per_row = [torch.nonzero(modality[b] == mod).flatten().tolist() for b in range(B)]
        total = sum(len(p) for p in per_row)
        if total == 0:
            continue
        if chunks is not None and sum(abs(c[2]) for c in chunks) == total and _chunks_fit_rows(chunks, per_row):
            _assign_chunks(spans, per_row, chunks, mod)
        else:
            _assign_runs(spans, per_row, mod)

    samples = []
    qstart = torch.empty(B, dtype=torch.long)
    for b in range(B):
        row_spans = tuple(sorted(spans[b], key=lambda s: s.start))
        pad = int((~valid[b]).long().cumprod(0).sum())  # leading padding only
        last_vision = max((s.end for s in row_spans), default=None)
        q = n if last_vision is None else last_vision
        qstart[b] = q
        samples.append(
            SampleLayout(
                length=n,
                pad=pad,
                spans=row_spans,
                markers=tuple(torch.nonzero(marker[b]).flatten().tolist()),
                question_start=q,
            )
        )
    dev = input_ids.device
    return Layout(family, modality.to(dev), valid.to(dev), marker.to(dev), qstart.to(dev), tuple(samples))


def _flat_image_chunks(chunks):
    # (item, frame, size) triples; images have no frames
    return None if chunks is None else [(i, -1, int(c)) for i, c in enumerate(chunks)]


def _flat_video_chunks(chunks):
    if chunks is None:
        return None
    out = []
    for v, frames in enumerate(chunks):
        f = 0
        for c in frames:
            if c < 0:  # tokens that belong to the video but to no frame
                out.append((v, -1, int(c)))
            else:
                out.append((v, f, int(c)))
                f += 1
    return out


def _chunks_fit_rows(chunks, per_row) -> bool:
    """Chunks are consumed in order over rows; none may straddle two rows."""
    sizes = [len(p) for p in per_row]
    row, used = 0, 0
    for _, _, c in chunks:
        c = abs(c)
        while row < len(sizes) and used == sizes[row]:
            row, used = row + 1, 0
        if row >= len(sizes) or used + c > sizes[row]:
            return False
        used += c
    return True


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Maximal contiguous runs of a sorted position list, as (start, end) pairs."""
    out: list[tuple[int, int]] = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


def _assign_chunks(spans, per_row, chunks, mod):
    row, used = 0, 0
    first_item = None  # item numbering restarts in every row
    for item, frame, c in chunks:
        c = abs(c)
        while used == len(per_row[row]):
            row, used, first_item = row + 1, 0, None
        if first_item is None:
            first_item = item
        # a chunk is contiguous in every processor we know; split defensively if it is not
        for start, end in _runs(per_row[row][used : used + c]):
            spans[row].append(Span(start, end, mod, item - first_item, frame))
        used += c


def _assign_runs(spans, per_row, mod):
    for b, pos in enumerate(per_row):
        for item, (start, end) in enumerate(_runs(pos)):
            # without frame sizes, each run of video tokens is one frame-less video
            spans[b].append(Span(start, end, mod, item, 0 if mod == Modality.VIDEO else -1))
