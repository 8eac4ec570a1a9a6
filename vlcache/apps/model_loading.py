"""Loading a model for the apps by name: the embedded model, a tiny random one, a hub id or a local directory."""

from __future__ import annotations

import torch

DEFAULT_MODEL = "embedded"
EMBEDDED_QWEN = "embedded-qwen"  # the second embedded model, a Qwen2-VL (M-RoPE, merged patches)


def load(name: str | None = None, *, device: str | None = None, dtype: torch.dtype | None = None, flag: str = "model"):
    """(model, processor) for a hub id or a local path. None or "embedded": the trained embedded model shipped in
    the package (a small Llava that reads synthetic videos); "embedded-qwen": its Qwen2-VL sibling; "tiny": a tiny
    Llava with random weights. Errors name the model as `flag` (the command line passes "--model")."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name in (None, DEFAULT_MODEL):
        from .evaluation.embedded_model import load_embedded

        return load_embedded(device=device)
    if name == EMBEDDED_QWEN:
        from .evaluation.embedded_model import load_embedded

        return load_embedded("qwen", device=device)
    if name == "tiny":
        from .. import testing

        return testing.build("llava").to(device), testing.processor("llava")
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from ..hf import compat
    from .model_source import resolve

    source = resolve(name, flag)  # a missing directory or an unreachable hub fails here, in seconds
    kw = {"local_files_only": True} if source.local_only else {}
    try:
        _check_family(f"{flag} {name}", AutoConfig.from_pretrained(source.name, **kw))  # before any weight is read
        processor = AutoProcessor.from_pretrained(source.name, **kw)
        model = compat.from_pretrained(
            AutoModelForImageTextToText, source.name, **kw, dtype=dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32),
            device_map=device,
        )  # fmt: skip
    except OSError as e:
        raise ValueError(f"cannot load model {name!r}: {_first_line(e)}") from e
    return model.eval(), processor


def _check_family(label: str, config) -> None:
    from ..modality import SUPPORTED_FAMILIES, UnsupportedModelError, family_for

    if family_for(config).name == "text":  # raises itself, listing the families, for anything else unknown
        raise UnsupportedModelError(
            f"{label}: a text-only {config.model_type} model; the apps need a vision-language model. "
            f"Supported vision-language families: {', '.join(SUPPORTED_FAMILIES)}"
        )


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def is_embedded(model) -> bool:
    from .evaluation.embedded_model import EMBEDDED_DIR, EMBEDDED_QWEN_DIR

    return str(getattr(model, "name_or_path", "")) in (str(EMBEDDED_DIR), str(EMBEDDED_QWEN_DIR))
