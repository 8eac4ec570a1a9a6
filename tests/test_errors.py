"""Bad input gets a clear error naming the problem, and leaves the model as it was."""

import re

import pytest
import torch
import transformers as T
from transformers import DynamicCache
from util import prompt_for

import vlcache
from vlcache import testing
from vlcache.hf.compat import cache_kwargs
from vlcache.policies import H2O, SnapKV


class _FakeVLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = T.MllamaConfig()


def test_unsupported_model_lists_families():
    with pytest.raises(vlcache.UnsupportedModelError, match="Supported vision-language families: llava"):
        with vlcache.compress(_FakeVLM(), SnapKV(budget=0.1)):
            pass


@pytest.mark.parametrize("budget", [0, 1.5, -1, 0.0])
def test_budget_out_of_range(tiny_model, budget):
    model = tiny_model("llava")
    with pytest.raises(ValueError, match="out of range"):
        with vlcache.compress(model, "snapkv", budget=budget):
            pass
    assert "generate" not in model.__dict__  # nothing was attached


def test_prompt_without_vision_tokens(tiny_model):
    """Documented behaviour: a text-only prompt is compressed like text under `budget`; a vision-only budget
    has nothing to act on and leaves the cache whole."""
    model = tiny_model("llava")
    ids = torch.tensor([[1] + testing.text_ids("a question with no image in it at all")])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    n = ids.shape[1]
    with vlcache.compress(model, SnapKV(budget=0.5, window=4)) as s:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert s.prefill_stats.layers[0].slots == n // 2
    with vlcache.compress(model, SnapKV(vision_budget=0.1)) as s:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert s.prefill_stats.layers[0].slots == n


def test_empty_prompt(tiny_model):
    model = tiny_model("llava")
    with vlcache.compress(model, SnapKV(budget=0.5)):
        with pytest.raises(ValueError, match="empty prompt"):
            model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


def test_nested_sessions(tiny_model):
    model = tiny_model("llava")
    with vlcache.compress(model, SnapKV(budget=0.5)):
        with pytest.raises(RuntimeError, match="already inside"):
            with vlcache.compress(model, H2O(budget=0.5)):
                pass


def test_unsupported_attention_implementation(tiny_model):
    model = tiny_model("llava")
    model.config.get_text_config()._attn_implementation_internal = "flex_attention"
    try:
        with pytest.raises(ValueError, match="sdpa"):
            with vlcache.compress(model, SnapKV(budget=0.5)):
                pass
    finally:
        model.config.get_text_config()._attn_implementation_internal = "sdpa"


def test_foreign_cache_and_chunked_prefill(tiny_model):
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    with vlcache.compress(model, SnapKV(budget=0.5)):
        with pytest.raises(ValueError, match="session.new_cache"):
            model.generate(**inputs, **cache_kwargs(DynamicCache(config=model.config)), max_new_tokens=2)
        with pytest.raises(ValueError, match="chunked prefill"):
            model.generate(**inputs, prefill_chunk_size=8, max_new_tokens=2)


def test_settings_next_to_a_policy_object(tiny_model):
    with pytest.raises(ValueError, match="go into the policy"):
        vlcache.attach(tiny_model("llava"), SnapKV(budget=0.5), window=8)


@pytest.mark.parametrize(
    "build",
    [
        lambda: T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32)),
        lambda: T.BertForMaskedLM(
            T.BertConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32)
        ),
    ],
    ids=["gpt2", "bert"],
)
def test_models_without_llama_style_layers_are_unsupported(build):
    """The README promises UnsupportedModelError listing the families (it was a bare ValueError)."""
    model = build()
    with pytest.raises(vlcache.UnsupportedModelError, match="Supported vision-language families: llava.*gemma3"):
        with vlcache.compress(model, SnapKV(budget=0.5)):
            pass
    assert "generate" not in model.__dict__


@pytest.fixture(scope="module")
def eight_frame_video(tmp_path_factory):
    from PIL import Image

    from vlcache.apps.video import write_video

    frames = [Image.new("RGB", (32, 32), (30 * i, 0, 0)) for i in range(8)]
    return write_video(tmp_path_factory.mktemp("video") / "v.mp4", frames)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(frames=0), "frames must be a positive whole number or None, got 0"),  # was: all 8 frames
        (dict(frames=-2), "frames must be a positive whole number or None, got -2"),  # was: numpy's own message
        (dict(frames=2.5), "frames must be a positive whole number"),
        (dict(frames=True), "frames must be a positive whole number"),
        (dict(frames=None, target_fps=0), "target_fps must be a positive number or None, got 0"),
        (dict(frames=None, target_fps=-1.0), "target_fps must be a positive number"),
        (dict(frames=None, target_fps=float("nan")), "target_fps must be a positive number"),
        (dict(cap=0), "cap must be a positive whole number, got 0"),
        (dict(cap=-3), "cap must be a positive whole number, got -3"),
    ],
    ids=["frames=0", "frames=-2", "frames=2.5", "frames=True", "fps=0", "fps=-1", "fps=nan", "cap=0", "cap=-3"],
)
def test_read_frames_names_a_bad_sampling_argument(eight_frame_video, kwargs, message):
    from vlcache.apps.video import sample_indices

    with pytest.raises(ValueError, match=re.escape(message)):
        vlcache.read_frames(eight_frame_video, **kwargs)
    with pytest.raises(ValueError, match=message.split(",")[0]):
        sample_indices(8, 4.0, **{"frames": 8, **kwargs})
    assert len(vlcache.read_frames(eight_frame_video, frames=3)) == 3  # good values still read
    assert len(vlcache.read_frames(eight_frame_video, frames=None)) == 8  # None: the default 8
    assert len(vlcache.read_frames(eight_frame_video, frames=None, target_fps=2, cap=3)) == 3


def test_use_cache_false_is_refused_inside_compress(tiny_model):
    """Without a cache every step recomputes the whole sequence: the session's cache took each step's whole
    sequence again, and the tokens differed from plain generate even under Full()."""
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    with vlcache.compress(model, "full"):
        with pytest.raises(ValueError, match="use_cache=False has no KV cache to compress"):
            model.generate(**inputs, max_new_tokens=3, use_cache=False, do_sample=False)
        model.generate(**inputs, max_new_tokens=2, do_sample=False)  # the session still works
