"""Synthetic video tasks whose answers live in a few vision tokens, for training and judging the embedded model.

A video is `frames` frames of 16 x 16 pixels (4 x 4 patches of 4 pixels, so 16 vision tokens a frame) of dark noise;
some frames hold one object, a patch-aligned 4 x 4 square of one of eight colours. The prompt names every frame
("f0 <image> f1 <image> ... ") and ends with a question; the model first says "=" and then the answer, so the
answer comes from a decode step that reads the (compressed) cache, never from the prefill logits.

Tasks (answers are single characters, but for the caption):
- needle: one frame holds an object; "color?" -> its colour.
- where: one frame holds an object; "where?" -> its frame index.
- lookup: 2 to 4 frames hold objects of different colours; "find r?" -> the frame of the object the question names.
  The shipped model has not learned it (about half right): it aligns the query of one colour letter at a time.
  Keying by frame instead ("f3 color?" -> the colour there) was tried and fared no better on an H100.
- count: a random number of frames hold an object; "count?" -> how many (needs every frame).
- describe: up to 4 objects; "describe?" -> which colours appear, one character per palette colour in a fixed order
  (its letter, or "." when absent), a caption scored per character.
- static: describe, filmed by a still camera: every frame is the first frame's background plus a little noise
  (+-3 of 255), with the objects placed as for describe. Most tokens repeat from frame to frame, which is what
  temporal merging removes. An evaluation task only (`EVAL_TASKS`): the model was trained on `TASKS`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

COLORS = {
    "r": (230, 40, 40),
    "g": (40, 200, 60),
    "b": (50, 90, 240),
    "y": (240, 220, 40),
    "p": (170, 60, 210),
    "o": (250, 140, 20),
    "w": (245, 245, 245),
    "c": (40, 220, 220),
}
COLOR_KEYS = list(COLORS)
SIZE, PATCH = 16, 4
GRID = SIZE // PATCH  # 4 x 4 patches = 16 vision tokens a frame
TASKS = ("needle", "where", "lookup", "count", "describe")  # what the embedded model was trained on
EVAL_TASKS = (*TASKS, "static")
QUESTIONS = {"needle": "color?", "where": "where?", "count": "count?", "describe": "describe?", "static": "describe?"}
STATIC_NOISE = 3  # +- this much per pixel between frames of a static scene
MAX_OBJECTS = 4  # lookup and describe
ANSWER_PREFIX = "="


@dataclass
class Example:
    task: str
    frames: list[Image.Image]
    question: str
    answer: str  # what follows "=" (one character, or one per frame for describe)
    objects: dict[int, tuple[int, str]]  # frame -> (patch index, colour key): where the answer lives

    def answer_patches(self) -> list[tuple[int, int]]:
        """(frame, patch) pairs that hold the answer: the ceiling of any compression."""
        return [(f, p) for f, (p, _) in self.objects.items()]


def _frame(rng: np.random.Generator, obj: tuple[int, str] | None, background: np.ndarray | None = None) -> Image.Image:
    if background is None:
        pix = rng.integers(0, 70, size=(SIZE, SIZE, 3), dtype=np.uint8)
    else:
        jitter = rng.integers(-STATIC_NOISE, STATIC_NOISE + 1, size=background.shape)
        pix = np.clip(background.astype(np.int16) + jitter, 0, 255).astype(np.uint8)
    if obj is not None:
        patch, color = obj
        r, c = divmod(patch, GRID)
        block = np.array(COLORS[color], dtype=np.int16) + rng.integers(-12, 13, size=(PATCH, PATCH, 3))
        pix[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = np.clip(block, 0, 255).astype(np.uint8)
    return Image.fromarray(pix)


def make_example(task: str, frames: int, rng: np.random.Generator) -> Example:
    """One example of `task` over `frames` frames."""
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(EVAL_TASKS)}")
    if task == "static":
        background = rng.integers(0, 70, size=(SIZE, SIZE, 3), dtype=np.uint8)
        ex = _make("describe", frames, rng, background)
        return Example("static", ex.frames, ex.question, ex.answer, ex.objects)
    return _make(task, frames, rng, None)


def _make(task: str, frames: int, rng: np.random.Generator, background: np.ndarray | None) -> Example:
    if task in ("where", "lookup") and frames > 10:
        raise ValueError(f"{task!r} answers with one digit: at most 10 frames")
    objects: dict[int, tuple[int, str]] = {}

    def put(f):
        objects[f] = (int(rng.integers(GRID * GRID)), COLOR_KEYS[int(rng.integers(len(COLOR_KEYS)))])

    if task in ("needle", "where"):
        put(int(rng.integers(frames)))
    elif task in ("lookup", "describe"):  # objects of distinct colours in distinct frames
        low = 2 if task == "lookup" else 0
        k = int(rng.integers(low, min(MAX_OBJECTS, frames) + 1))
        colors = rng.permutation(len(COLOR_KEYS))[:k]
        for f, c in zip(sorted(int(x) for x in rng.permutation(frames)[:k]), colors):
            objects[f] = (int(rng.integers(GRID * GRID)), COLOR_KEYS[int(c)])
    else:  # count: a uniform number of frames hold an object
        for f in sorted(int(x) for x in rng.permutation(frames)[: int(rng.integers(0, min(frames, 9) + 1))]):
            put(f)
    images = [_frame(rng, objects.get(f), background) for f in range(frames)]
    if task == "needle":
        (patch_color,) = objects.values()
        question, answer = QUESTIONS[task], patch_color[1]
    elif task == "where":
        question, answer = QUESTIONS[task], str(next(iter(objects)))
    elif task == "lookup":
        frame = list(objects)[int(rng.integers(len(objects)))]
        question, answer = f"find {objects[frame][1]}?", str(frame)  # no colour letter in "find"
        objects = {frame: objects[frame]}  # only that object holds the answer
    elif task == "count":
        question, answer = QUESTIONS[task], str(len(objects))
    else:
        present = {color for _, color in objects.values()}
        question, answer = QUESTIONS[task], "".join(c if c in present else "." for c in COLOR_KEYS)
    return Example(task, images, question, answer, objects)


def prompt_text(frames: int, question: str, image_token: str = "<image>") -> str:
    """The prompt as text: a marker before every frame, then the question."""
    return "".join(f"f{i}{image_token}" for i in range(frames)) + " " + question


def score(task: str, predicted: str, answer: str) -> float:
    """1 for a right answer, 0 for a wrong one; describe scores the share of frames captioned right."""
    if not predicted.startswith(ANSWER_PREFIX):
        return 0.0
    predicted = predicted[len(ANSWER_PREFIX) :]
    if task in ("describe", "static"):
        return sum(a == b for a, b in zip(predicted, answer)) / len(answer)
    return float(predicted == answer)


def chance(task: str, frames: int) -> float:
    """Accuracy of guessing (the floor a model without vision should sit at)."""
    if task == "needle":
        return 1 / len(COLOR_KEYS)
    if task in ("where", "lookup"):
        return 1 / frames
    if task == "count":
        return 1 / (min(frames, 9) + 1)
    return 0.5  # describe and static, per character: present or not
