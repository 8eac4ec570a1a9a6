"""Modality map: which cached positions are text, image, video frame, or the question after the images."""

from .families import SUPPORTED_FAMILIES, Family, UnsupportedModelError, family_for, layout_kwargs
from .layout import Layout, Modality, SampleLayout, Span, build_layout


def layout_from_inputs(config, inputs, processor=None, family: Family | None = None) -> Layout:
    """The `Layout` of a batch of model inputs (what the processor returned) for a model with this config."""
    family = family or family_for(config, processor)
    ids = inputs.get("input_ids")
    if ids is None:
        raise ValueError("vlcache needs input_ids to map modalities (inputs_embeds alone carry no token ids)")
    return build_layout(ids, attention_mask=inputs.get("attention_mask"), **layout_kwargs(family, ids, inputs, config))


__all__ = [
    "SUPPORTED_FAMILIES",
    "Family",
    "Layout",
    "Modality",
    "SampleLayout",
    "Span",
    "UnsupportedModelError",
    "build_layout",
    "family_for",
    "layout_from_inputs",
]
