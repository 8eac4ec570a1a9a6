"""Temporal merging before the language model (in the spirit of FrameFusion, DyCoke and vLLM's EVS): a video
frame's token that nearly repeats the token at the same place in an earlier frame is dropped, so the language
model never computes on it.

Works on the projected vision embeddings as they enter the language model and on the prompt's `Layout`; torch
only (the Hugging Face hook that applies it is `vlcache.hf.merge`).
"""

from __future__ import annotations

import torch

from ..modality import Layout, Modality

COSINE_SLACK = 1e-5  # fp32 cosines of identical tokens land up to a few ulps below 1.0


def frame_sequences(layout: Layout, b: int) -> list[list[torch.Tensor]]:
    """Row b's runs of frames that can be compared place by place: for each video, its frames in order (tokens
    of no frame, such as LLaVA-OneVision's end-of-video newline, are left out); for images, each run of
    consecutive images with the same number of tokens. A frame is a [t] tensor of prompt positions."""
    sample = layout.samples[b]
    out = []
    for spans in sample.videos:
        frames: dict[int, list[int]] = {}
        for s in spans:
            if s.frame >= 0:
                frames.setdefault(s.frame, []).extend(range(s.start, s.end))
        seq = [torch.tensor(frames[f]) for f in sorted(frames)]
        out += _equal_runs(seq)
    images = [torch.tensor([p for s in spans for p in range(s.start, s.end)]) for spans in sample.images]
    out += _equal_runs(images)
    return [run for run in out if len(run) > 1]


def _equal_runs(frames: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    runs: list[list[torch.Tensor]] = []
    for f in frames:
        if runs and len(runs[-1][-1]) == len(f):
            runs[-1].append(f)
        else:
            runs.append([f])
    return runs


def temporal_keep(
    embeds: torch.Tensor, layout: Layout, threshold: float, mode: str = "drop"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [B, n] bool, embeddings [B, n, D]) after temporal merging.

    Within each run of frames the first frame is kept whole. Every later frame is compared place by place with
    a reference: for each place, the token of the frame that last kept that place. A token whose cosine
    similarity to its reference is >= `threshold` is dropped; otherwise it is kept and becomes the reference of
    its place. With mode "mean" each dropped token is also averaged into its reference (embeddings returned
    changed there); with "drop" the embeddings come back as given. A threshold above 1 keeps everything.
    Padding and text are always kept (keep is False only at dropped vision tokens and at padding).
    """
    B, n, _ = embeds.shape
    keep = layout.valid.clone().to(embeds.device)
    out = embeds.clone() if mode == "mean" else embeds
    for b in range(B):
        for run in frame_sequences(layout, b):
            first = run[0].to(embeds.device)
            ref_pos = first.clone()  # [t] the position holding each place's reference
            ref = _unit(embeds[b, first])
            total = embeds[b, first].float() if mode == "mean" else None
            count = torch.ones(len(first), device=embeds.device) if mode == "mean" else None
            for frame in run[1:]:
                frame = frame.to(embeds.device)
                x = embeds[b, frame]
                # less a rounding margin: identical tokens' fp32 cosine can land a few ulps under 1.0
                same = (_unit(x) * ref).sum(-1) >= threshold - COSINE_SLACK  # [t]
                keep[b, frame[same]] = False
                if mode == "mean":
                    # a place's running sum is written back to its reference when the reference changes
                    _flush(out, b, ref_pos, total, count, ~same)
                    total = torch.where(same[:, None], total + x.float(), x.float())
                    count = torch.where(same, count + 1, torch.ones_like(count))
                ref = torch.where(same[:, None], ref, _unit(x))
                ref_pos = torch.where(same, ref_pos, frame)
            if mode == "mean":
                _flush(out, b, ref_pos, total, count, torch.ones_like(ref_pos, dtype=torch.bool))
    return keep, out


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def _flush(out, b, ref_pos, total, count, which):
    """Write the mean of each chosen place's group into its reference token (only groups that merged)."""
    sel = which & (count > 1)
    if bool(sel.any()):
        out[b, ref_pos[sel]] = (total[sel] / count[sel, None]).to(out.dtype)


def compact(keep: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, m], holds_token [B, m]): the kept positions of every row, ascending, m = the most any row
    keeps. A row keeping fewer fills up with its padding first, then with the leftmost positions it dropped
    (marked False in holds_token: masked out like padding)."""
    B, n = keep.shape
    m = int(keep.sum(-1).max()) if keep.numel() else 0
    pos = torch.arange(n, device=keep.device).expand(B, n)
    # order: kept tokens, then padding, then dropped tokens; each group by position
    key = torch.where(keep, -1, torch.where(valid.to(keep.device), n + pos, pos))
    chosen = key.topk(m, dim=-1, largest=False).indices.sort(-1).values
    return chosen, keep.gather(1, chosen)


def merged_counts(layout: Layout, keep: torch.Tensor) -> dict[str, int]:
    """Vision tokens dropped per modality (the whole batch)."""
    dropped = layout.valid.to(keep.device) & ~keep
    mod = layout.modality.to(keep.device)
    return {
        name: int((dropped & (mod == m)).sum()) for m, name in ((Modality.IMAGE, "image"), (Modality.VIDEO, "video"))
    }
