"""Tiny config-built VLMs, hub-free processors and hand-built inputs (tests, the default main job, benchmarks)."""

from .inputs import IMAGE, Example, Video, make_inputs, text_ids
from .models import BUILDERS, build
from .processors import IMAGE_PLACEHOLDER, processor

__all__ = [
    "BUILDERS",
    "IMAGE",
    "IMAGE_PLACEHOLDER",
    "Example",
    "Video",
    "build",
    "make_inputs",
    "processor",
    "text_ids",
]
