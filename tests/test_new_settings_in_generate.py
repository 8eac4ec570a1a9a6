"""Lookahead, cascading VL-Cache and per-head budgets inside `generate`, on a flat patch grid (Llava), a video
(LlavaOnevision) and M-RoPE with merged patches (Qwen2-VL): keep-all is the identity, a budget is kept exactly."""

import pytest
import torch
from util import prompt_for

import vlcache
from vlcache import testing
from vlcache.policies import SnapKV, VLCache

FAMILIES = ["llava", pytest.param("llava_onevision", marks=pytest.mark.slow), "qwen2_vl"]  # the video one: full suite
SETTINGS = [
    {"lookahead": 2},
    {"cascading": True},
    {"head_budgets": "adaptive"},
    {"lookahead": 1, "head_budgets": "adaptive", "lookahead_share": 1.0},
]


def _run(model, inputs, policy):
    with vlcache.compress(model, policy) as session:
        out = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    return out, session.prefill_stats


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_keep_all_is_the_identity(tiny_model, family, settings):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    plain = model.generate(**inputs, do_sample=False, max_new_tokens=6)
    out, _ = _run(model, inputs, VLCache(vision_budget=1.0, **settings))
    assert torch.equal(out, plain)


def _kept(stats):
    """Real tokens kept over all layers and KV heads: text, vision."""
    per = [(s.kept["text"], s.kept["image"] + s.kept["video"]) for s in stats.layers]
    return sum(t for t, _ in per), sum(v for _, v in per)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("settings", SETTINGS, ids=str)
def test_a_budget_is_kept_exactly(tiny_model, family, settings):
    # the same totals as the plain policy: the settings move tokens between layers, heads or scoring rows only
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    policy_cls = SnapKV if settings.get("head_budgets") and not settings.get("lookahead") else VLCache
    extra = {"window": 4} if policy_cls is SnapKV else {}
    _, plain = _run(model, inputs, policy_cls(vision_budget=0.2, **extra))
    _, stats = _run(model, inputs, policy_cls(vision_budget=0.2, **extra, **settings))
    assert _kept(stats) == pytest.approx(_kept(plain))
    vision = stats.prompt["image"] + stats.prompt["video"]
    assert _kept(stats)[1] / len(stats.layers) < vision
