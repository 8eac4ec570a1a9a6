"""The modality map, checked exactly against hand-built prompts for every family."""

import pytest
import torch
import transformers as T
from util import FAMILIES, VIDEO_FAMILIES, layout_from_ids

from vlcache import testing
from vlcache.modality import Modality, Span, UnsupportedModelError, build_layout, family_for, layout_from_inputs

PROMPTS = {
    "multi-image, text between": ["ab", testing.IMAGE, "cd", testing.IMAGE, "q?"],
    "adjacent images": ["ab", testing.IMAGE, testing.IMAGE, "q?"],
    "image then video": ["ab", testing.IMAGE, "x", testing.Video(4), "q?"],
    "video only": ["describe", testing.Video(6), "now"],
}


def _cases():
    for fam in FAMILIES:
        for name, segs in PROMPTS.items():
            has_video = any(isinstance(s, testing.Video) for s in segs)
            if has_video and fam not in VIDEO_FAMILIES:
                continue
            if fam == "llava_next_video" and testing.IMAGE in segs:
                continue  # its tiny model is built for videos
            yield pytest.param(fam, segs, id=f"{fam}-{name}")


@pytest.mark.parametrize("family,segments", list(_cases()))
def test_spans_match_hand_built_prompt(tiny_model, family, segments):
    model = tiny_model(family)
    ex = testing.make_inputs(model, segments)
    layout = layout_from_inputs(model.config, ex.inputs)
    (sample,) = layout.samples
    assert list(sample.spans) == ex.spans[0]
    if family not in ("idefics3", "smolvlm", "internvl"):  # their marker ids live in the tokenizer only
        assert list(sample.markers) == ex.markers[0]
    last_vision = max(s.end for s in ex.spans[0])
    assert sample.question_start == last_vision
    n_images = sum(1 for s in segments if s is testing.IMAGE)
    assert len(sample.images) == n_images
    videos = [s for s in segments if isinstance(s, testing.Video)]
    assert len(sample.videos) == len(videos)
    for v, spans in zip(videos, sample.videos):
        frames = [s for s in spans if s.frame >= 0]
        expect = v.frames // 2 if family.startswith("qwen") else v.frames
        assert [s.frame for s in frames] == list(range(expect))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_onevision", "gemma3"])
def test_left_padded_batch(tiny_model, family):
    model = tiny_model(family)
    rows = [["ab", testing.IMAGE, "what is it?"], ["a", testing.IMAGE, "x", testing.IMAGE, "longer question here"]]
    ex = testing.make_inputs(model, rows)
    layout = layout_from_inputs(model.config, ex.inputs)
    for b in range(2):
        assert list(layout.samples[b].spans) == ex.spans[b]
        assert layout.samples[b].pad == ex.pad[b]
        assert not layout.valid[b, : ex.pad[b]].any() and layout.valid[b, ex.pad[b] :].all()
    # question rows are real tokens after the last vision token, in every row
    q = layout.question
    for b in range(2):
        assert q[b].sum() == layout.length - max(s.end for s in ex.spans[b])


def test_tensors_agree_with_spans():
    ids = [1, 5, 9, 9, 9, 6, 8, 9, 9, 8, 7, 7]
    layout = layout_from_ids(ids)
    (s,) = layout.samples
    assert s.spans == (Span(2, 5, Modality.IMAGE, 0), Span(7, 9, Modality.IMAGE, 1))
    assert s.markers == (6, 9)
    assert s.question_start == 9
    assert layout.describe() == "TTIIITMIIMTT"
    assert layout.span_index[0].tolist() == [-1, -1, 0, 0, 0, -1, -1, 1, 1, -1, -1, -1]
    assert layout.question[0].tolist() == [False] * 9 + [True] * 3
    assert layout.counts() == {"text": 7, "image": 5, "video": 0}
    assert s.text_spans == [(0, 2), (5, 7), (9, 12)]


def test_prompt_without_vision_has_empty_question():
    layout = layout_from_ids([1, 5, 6, 7])
    assert not layout.has_vision
    assert layout.samples[0].question_start == 4
    assert not layout.question.any()


def test_chunks_split_adjacent_runs_and_fall_back_when_inconsistent():
    ids = torch.tensor([[1, 9, 9, 9, 9, 9, 2]])
    kw = dict(family="t", image_token=9, video_token=None)
    split = build_layout(ids, image_chunks=[2, 3], **kw).samples[0].spans
    assert split == (Span(1, 3, Modality.IMAGE, 0), Span(3, 6, Modality.IMAGE, 1))
    # counts that do not add up to the tokens present are ignored: one span per run
    runs = build_layout(ids, image_chunks=[2, 2], **kw).samples[0].spans
    assert runs == (Span(1, 6, Modality.IMAGE, 0),)


def test_idefics_tiles_group_into_images_with_the_tokenizer():
    proc = testing.processor("idefics3")
    model = testing.build("idefics3")
    fam = family_for(model.config, proc)
    glob = proc.tokenizer.convert_tokens_to_ids("<global-img>")
    fake = proc.tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
    assert {glob, fake} <= fam.markers
    I = model.config.image_token_id  # noqa: E741
    # image 0 = two tiles then its global view; image 1 = global view only
    ids = [1, fake, 60, I, I, fake, 61, I, I, fake, glob, I, I, fake, 5, fake, glob, I, I, fake, 7]
    layout = layout_from_inputs(model.config, {"input_ids": torch.tensor([ids])}, processor=proc)
    images = layout.samples[0].images
    assert [[(s.start, s.end) for s in img] for img in images] == [[(3, 5), (7, 9), (11, 13)], [(17, 19)]]


def test_unsupported_model_names_supported_families():
    cfg = T.MllamaConfig()
    with pytest.raises(UnsupportedModelError, match="llava.*qwen2_vl"):
        family_for(cfg)


def test_text_only_decoder_is_supported():
    fam = family_for(T.LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2))
    assert fam.name == "text" and fam.image_token is None


def test_empty_prompt_raises():
    with pytest.raises(ValueError, match="empty prompt"):
        layout_from_ids(torch.zeros(1, 0, dtype=torch.long))
