"""The synthetic tasks drawn as tensors on the training device, without PIL.

`tasks.make_example` draws one example as PIL frames that the processor then converts: right for judging, but about
a second of CPU for a batch of 256 eight-frame videos, which would leave a GPU idle. `draw_batch` draws a whole batch
from the same distribution in a few tensor operations, and `encode` turns its pixels and text into exactly the
inputs `model.batch_inputs` makes through the processor of either embedded model (`family`, "llava" by default;
tests/test_tensor_tasks.py checks both), taking the normalisation and the token ids from that processor. For the
Qwen2-VL one that means the processor's whole path: the 2x nearest-neighbour upscale, the temporal copy of each
frame, the patch order that puts every 2 x 2 merge together, `image_grid_thw` and `mm_token_type_ids`.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .embedded_model import (
    FAMILIES,
    IMAGE_TOKEN_ID,
    PROCESSORS,
    QWEN_MERGE,
    QWEN_PATCH,
    QWEN_SCALE,
    QWEN_TEMPORAL,
    image_prompt,
)
from .tasks import ANSWER_PREFIX, COLOR_KEYS, COLORS, GRID, MAX_OBJECTS, PATCH, QUESTIONS, SIZE, TASKS, prompt_text

IMAGE = "<image>"


@lru_cache(maxsize=len(FAMILIES))
def processor(family: str = "llava"):
    """The processor of an embedded model `family` (built, not loaded: the tensor path needs no checkpoint)."""
    if family not in PROCESSORS:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
    return PROCESSORS[family]()


@lru_cache(maxsize=8192)  # a batch repeats a few hundred distinct prompts at most
def token_ids(text: str, family: str = "llava") -> tuple[int, ...]:
    """The processor's token ids for `text`, every image token expanded to one frame's vision tokens as it does."""
    image = processor(family).image_token
    expanded = text.replace(image, image * (GRID * GRID))
    return tuple(processor(family).tokenizer(expanded, add_special_tokens=False)["input_ids"])


def qwen_patches(frames: torch.Tensor) -> torch.Tensor:
    """[N, 3, SIZE, SIZE] normalised frames -> [N * 64, 3 * 2 * 4 * 4] the rows of Qwen2-VL's `pixel_values`:
    upscaled 2x, cut into 4-px patches ordered merge group by merge group (row-major), each patch channel, time
    (the frame twice), row, column, as `Qwen2VLImageProcessorPil.patchify` lays them out."""
    n, m, p = frames.shape[0], QWEN_MERGE, QWEN_PATCH
    big = frames.repeat_interleave(QWEN_SCALE, 2).repeat_interleave(QWEN_SCALE, 3)
    g = big.shape[-1] // p  # patches a side
    x = big.reshape(n, 3, g // m, m, p, g // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)  # n, gh, gw, mh, mw, C, ph, pw
    x = x[:, :, :, :, :, :, None].expand(*x.shape[:6], QWEN_TEMPORAL, p, p)
    return x.reshape(n * g * g, 3 * QWEN_TEMPORAL * p * p)


def encode(pixels: torch.Tensor, texts: list[str], answers: list[str] | None = None, family: str = "llava") -> dict:
    """Model inputs from uint8 frames (batch, frames, SIZE, SIZE, 3) and prompt texts of equal length; with
    `answers`, the answer ("=" and what follows) is appended and is all that `labels` scores."""
    device = pixels.device
    if answers is not None:
        texts = [t + ANSWER_PREFIX + a for t, a in zip(texts, answers)]
    ids = torch.tensor([token_ids(t, family) for t in texts], device=device)
    images = processor(family).image_processor
    mean = torch.tensor(images.image_mean, device=device).view(3, 1, 1)
    std = torch.tensor(images.image_std, device=device).view(3, 1, 1)
    frames = (pixels.reshape(-1, SIZE, SIZE, 3).permute(0, 3, 1, 2).float() * images.rescale_factor - mean) / std
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "qwen2_vl":
        side = QWEN_SCALE * SIZE // QWEN_PATCH
        inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN_ID).long()  # 1 image, 0 text (2 would be video)
        inputs["pixel_values"] = qwen_patches(frames)
        inputs["image_grid_thw"] = torch.tensor([[1, side, side]], device=device).expand(frames.shape[0], 3).clone()
    else:
        inputs["pixel_values"] = frames
    if answers is not None:
        labels = ids.clone()
        labels[:, : ids.shape[1] - len(ANSWER_PREFIX + answers[0])] = -100
        inputs["labels"] = labels
    return inputs


def _uniform_int(low: torch.Tensor | int, high: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One integer per row in [low, high] (inclusive; bounds per row)."""
    u = torch.rand(high.shape, generator=g, device=high.device)
    return (low + (u * (high - low + 1)).floor()).long().clamp(max=high)


def _random_ranks(rows: int, n: int, g: torch.Generator, device) -> torch.Tensor:
    """Each row a uniformly random permutation of 0..n-1 (the rank of every slot)."""
    return torch.rand(rows, n, generator=g, device=device).argsort(1).argsort(1)


def color_indices(colors: str | None, least: int = 1) -> list[int]:
    """Palette indices of the colour keys in `colors` (None: the whole palette); at least `least` distinct keys."""
    if colors is None:
        return list(range(len(COLOR_KEYS)))
    if len(set(colors)) != len(colors) or not set(colors) <= set(COLOR_KEYS) or len(colors) < least:
        raise ValueError(f"colors={colors!r}: give at least {least} distinct keys of {''.join(COLOR_KEYS)}")
    return [COLOR_KEYS.index(k) for k in colors]


def draw_batch(
    task: str,
    frames: int,
    batch: int,
    g: torch.Generator,
    device=None,
    targets: bool = False,
    colors: str | None = None,
    family: str = "llava",
) -> tuple[dict, list[str]] | tuple[dict, list[str], torch.Tensor]:
    """(`encode`'s inputs with labels, answers) for `batch` examples of `task` over `frames` frames, drawn from the
    distribution `tasks.make_example` draws from. With `targets`, also [batch] the sequence position of the vision
    token that holds the answer (the named object's patch for lookup; -1 for count and describe, whose answers
    need many), for training that supervises attention. With `colors` (colour keys, e.g. "bcr"), objects take only
    those colours: for training on the lookups a model confuses (the default draw is unchanged by the option).
    `family`: whose inputs (the pixels and answers drawn do not depend on it; a frame's 16 tokens are its 4 x 4
    cells in row-major order in both models)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    low = 2 if task == "lookup" else 1
    if not low <= frames <= (10 if task in ("where", "lookup") else 10**4):
        raise ValueError(f"{task!r} needs {low} to 10 frames" if task in ("where", "lookup") else "frames must be >= 1")
    keys = color_indices(colors, least=low)
    device = torch.device(device or "cpu")
    B, F, C = batch, frames, len(keys)
    keys = torch.tensor(keys, device=device)
    full = torch.full((B,), 0, device=device)
    slot_rank = _random_ranks(B, F, g, device)  # frames holding objects: those ranked below the object count
    if task in ("needle", "where"):
        count = full + 1
    elif task == "lookup":
        count = _uniform_int(2, full + min(MAX_OBJECTS, F, C), g)  # distinct colours: no more objects than colours
    elif task == "describe":
        count = _uniform_int(0, full + min(MAX_OBJECTS, F, C), g)
    else:
        count = _uniform_int(0, full + min(F, 9), g)
    has = slot_rank < count[:, None]  # (B, F)
    patch = torch.randint(GRID * GRID, (B, F), generator=g, device=device)
    if task in ("lookup", "describe"):  # distinct colours: the i-th object frame (in order) takes a permutation's i-th
        perm = keys[torch.rand(B, C, generator=g, device=device).argsort(1)]
        order = (has.long().cumsum(1) - 1).clamp(min=0)
        color = perm.gather(1, order)
    else:
        color = keys[torch.randint(C, (B, F), generator=g, device=device)]

    noise = torch.randint(0, 70, (B, F, SIZE, SIZE, 3), generator=g, device=device, dtype=torch.int16)
    jitter = torch.randint(-12, 13, (B, F, SIZE, SIZE, 3), generator=g, device=device, dtype=torch.int16)
    palette = torch.tensor(list(COLORS.values()), dtype=torch.int16, device=device)
    block = (palette[color][:, :, None, None, :] + jitter).clamp(0, 255)
    rows = torch.arange(SIZE, device=device) // PATCH
    in_patch = (rows[:, None] == (patch // GRID)[..., None, None]) & (rows[None, :] == (patch % GRID)[..., None, None])
    pixels = torch.where((in_patch & has[..., None, None])[..., None], block, noise).to(torch.uint8)

    has_c, color_c, count_c, patch_c = has.cpu(), color.cpu(), count.cpu(), patch.cpu()
    frame = has_c.long().argmax(1)  # needle and where: the one object's frame
    if task == "lookup":
        pick = _uniform_int(0, count - 1, g).cpu()  # which object (in frame order) the question names
        target = ((has_c.long().cumsum(1) - 1) == pick[:, None]) & has_c
        frame = target.long().argmax(1)
        questions = [f"find {COLOR_KEYS[int(color_c[b, frame[b]])]}?" for b in range(B)]
        answers = [str(int(f)) for f in frame]
    else:
        questions = [QUESTIONS[task]] * B
        if task == "needle":
            answers = [COLOR_KEYS[int(color_c[b][has_c[b]][0])] for b in range(B)]
        elif task == "where":
            answers = [str(int(f)) for f in frame]
        elif task == "count":
            answers = [str(int(n)) for n in count_c]
        else:
            answers = [
                "".join(k if i in set(color_c[b][has_c[b]].tolist()) else "." for i, k in enumerate(COLOR_KEYS))
                for b in range(B)
            ]
    texts = [prompt_text(F, q, image_prompt(processor(family))) for q in questions]
    inputs = encode(pixels, texts, answers, family)
    if not targets:
        return inputs, answers
    if task in ("count", "describe"):
        return inputs, answers, torch.full((B,), -1, device=device)
    vision = (inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[:, 0]  # every row has the same layout
    token = frame * GRID * GRID + patch_c.gather(1, frame[:, None])[:, 0]
    return inputs, answers, vision.cpu()[token].to(device)
