"""Cutting prefill: prune_at (drop vision tokens inside the language model after layer K) and temporal_merge
(drop near-repeated frame tokens before it)."""

import pytest
import torch
from util import FAMILIES, VIDEO_FAMILIES, prompt_for

import vlcache
from vlcache import testing
from vlcache.hf.compat import cache_kwargs
from vlcache.hf.model_parts import attention_modules, decoder
from vlcache.modality import Modality, build_layout, layout_from_inputs
from vlcache.policies import H2O, Full, Random, SnapKV, StreamingLLM, VLCache, make_policy
from vlcache.policies.temporal import compact, frame_sequences, temporal_keep

GREEDY = dict(do_sample=False)


def _generate(model, inputs, policy=None, **kw):
    if policy is None:
        return model.generate(**inputs, **GREEDY, **kw)
    with vlcache.compress(model, policy) as session:
        out = model.generate(**inputs, **GREEDY, **kw)
    return out, session


def _last_full_layer(model):
    types = getattr(model.config.get_text_config(), "layer_types", None) or []
    return max((i for i, t in enumerate(types) if t == "full_attention"), default=0) if types else 0


# ------------------------------------------------------------------------------------------------ prune_at


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_at_with_keep_all_budgets_is_token_identical(tiny_model, family):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    plain = _generate(model, inputs, max_new_tokens=10)
    K = _last_full_layer(model) if family == "gemma3" else 0  # Gemma 3: no sliding layer may follow K
    for policy in (SnapKV(budget=1.0, prune_at=K), VLCache(vision_budget=1.0, prune_at=K)):
        out, _ = _generate(model, inputs, policy, max_new_tokens=10)
        assert torch.equal(out, plain), f"{policy.name} prune_at={K} changed the output"


def _capture_layer_inputs(model, layer):
    seen = {}

    def hook(module, args, kwargs):
        if "pe" not in seen:  # the prompt's forward only
            seen["pe"] = tuple(t.detach().clone() for t in kwargs["position_embeddings"])
            seen["n"] = (args[0] if args else kwargs["hidden_states"]).shape[1]

    return seen, decoder(model).layers[layer].register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_onevision"])
def test_layers_after_k_get_the_kept_tokens_original_positions(tiny_model, family):
    """The rotary tables reaching a layer after K are the whole prompt's tables at the kept positions (M-RoPE
    included): positions are sliced, never renumbered."""
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    with vlcache.compress(model, SnapKV(vision_budget=0.3, window=4, prune_at=0)) as session:
        first, h0 = _capture_layer_inputs(model, 0)  # registered after vlcache's own hooks: sees what they pass on
        after, h1 = _capture_layer_inputs(model, 1)
        try:
            model.generate(**inputs, max_new_tokens=2, **GREEDY)
        finally:
            h0.remove()
            h1.remove()
    kept = session.last_cache.layers[1].slot_positions()[0, 0, : after["n"]]
    n = inputs["input_ids"].shape[1]
    assert after["n"] < n, "layer 1 must compute on fewer tokens than the prompt"
    for full_table, cut_table in zip(first["pe"], after["pe"]):
        torch.testing.assert_close(cut_table, full_table[..., kept, :])
    assert not torch.equal(kept, torch.arange(len(kept))), "kept tokens are not the first ones: a real test"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
def test_layers_after_k_hold_exactly_the_kept_tokens(tiny_model, family):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    layout = layout_from_inputs(model.config, inputs)
    n_vision = int(layout.vision.sum())
    budget = 0.25
    _, session = _generate(
        model, inputs, SnapKV(vision_budget=budget, window=1, protect=("markers",), prune_at=0), max_new_tokens=1
    )
    cache = session.last_cache
    after = cache.layers[1].slot_positions()
    assert torch.equal(after, after[:, :1].expand_as(after)), "one choice for every KV head"
    kept = after[0, 0]
    vision_kept = int(layout.vision[0, kept.clamp(max=layout.length - 1)][kept < layout.length].sum())
    assert vision_kept == int(budget * n_vision)  # the policy's vision budget, exactly
    assert int((~layout.vision[0, kept[kept < layout.length]]).sum()) == int(layout.text.sum())  # all text
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]  # one new token: only the prompt is cached
    assert cache.layers[1].get_seq_length() == cache.layers[0].get_seq_length()  # logical lengths agree


def test_padded_batch_with_prune_at_equals_each_prompt_alone(tiny_model):
    model = tiny_model("qwen2_vl")
    rows = [["ab", testing.IMAGE, "what is it?"], ["abcdefgh", testing.IMAGE, "cd", testing.Video(4), "and this?"]]
    batch = testing.make_inputs(model, rows, seed=3).inputs
    assert not bool(batch["attention_mask"].all()), "a padded batch"
    for policy in (SnapKV(vision_budget=0.3, window=4, prune_at=0), H2O(vision_budget=0.4, prune_at=0)):
        together, _ = _generate(model, batch, policy, max_new_tokens=6, min_new_tokens=6)
        n = batch["input_ids"].shape[1]
        for i, row in enumerate(rows):
            alone_inputs = testing.make_inputs(model, [row], seed=3 + i).inputs
            alone, _ = _generate(model, alone_inputs, policy, max_new_tokens=6, min_new_tokens=6)
            assert torch.equal(together[i, n:], alone[0, alone_inputs["input_ids"].shape[1] :]), (policy.name, i)


def test_prune_at_keeps_decode_time_eviction_on_the_layers_up_to_k(tiny_model):
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    _, session = _generate(model, inputs, StreamingLLM(budget=20, prune_at=0), max_new_tokens=6, min_new_tokens=6)
    cache = session.last_cache
    assert cache.layers[0].physical_length == 20  # held at budget while decoding
    assert cache.layers[1].physical_length == 20 + 5  # after K: what K passed on, plus the generated tokens


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(prune_at=-1), "prune_at must be a decoder layer index"),
        (dict(prune_at=1.5), "prune_at must be a decoder layer index"),
        (dict(temporal_merge=0.0), r"temporal_merge must be a cosine threshold in \(0, 1\]"),
        (dict(temporal_merge=1.5), r"temporal_merge must be a cosine threshold in \(0, 1\]"),
        (dict(temporal_merge=float("nan")), "temporal_merge must be"),
        (dict(temporal_mode="max"), "temporal_mode must be one of"),
    ],
)
def test_bad_reduction_settings_raise(settings, match):
    with pytest.raises(ValueError, match=match):
        SnapKV(budget=0.5, **settings)


def test_prune_at_beyond_the_last_layer_and_on_full_raise(tiny_model):
    model = tiny_model("llava")
    with pytest.raises(ValueError, match=r"prune_at=2 is beyond the model's last decoder layer \(1\)"):
        vlcache.attach(model, SnapKV(budget=0.5, prune_at=2))
    with pytest.raises(ValueError, match="full keeps every token"):
        Full(prune_at=0)
    assert getattr(model, "_vlcache_session", None) is None


def test_gemma3_sliding_layers_are_refused_with_a_clear_error(tiny_model):
    model = tiny_model("gemma3")
    with pytest.raises(ValueError, match=r"decoder layers \[0\] use sliding-window attention"):
        vlcache.attach(model, SnapKV(budget=0.5, prune_at=0))
    with pytest.raises(ValueError, match="temporal merging needs full-attention layers only"):
        vlcache.attach(model, Full(temporal_merge=0.9))
    assert getattr(model, "_vlcache_session", None) is None


# ------------------------------------------------------------------------------------------------ temporal merging


def _static_video(model, family, frames=4):
    """Inputs whose video frames are pixel-identical (and, for Llava, two identical images)."""
    if family == "llava":
        ex = testing.make_inputs(model, ["ab", testing.IMAGE, "cd", testing.IMAGE, "what?"])
        ex.inputs["pixel_values"][1] = ex.inputs["pixel_values"][0]
        return ex
    ex = testing.make_inputs(model, ["ab", testing.Video(frames), "what?"])
    pv = ex.inputs["pixel_values_videos"]
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        t, _, _ = ex.inputs["video_grid_thw"][0].tolist()
        per = pv.shape[0] // t
        for i in range(1, t):
            pv[i * per : (i + 1) * per] = pv[:per]
    else:
        pv[:, 1:] = pv[:, :1]
    return ex


def test_temporal_keep_threshold_above_one_is_the_identity():
    layout = build_layout(
        torch.tensor([[1, 9, 9, 9, 9, 9, 9, 2]]), family="test", image_token=9, video_token=None, image_chunks=[3, 3]
    )
    embeds = torch.randn(1, 8, 4)
    embeds[0, 4:7] = embeds[0, 1:4]  # the second image repeats the first
    keep, out = temporal_keep(embeds, layout, 1.01)
    assert bool(keep.all()) and out is embeds
    keep, _ = temporal_keep(embeds, layout, 0.99)
    assert keep[0].tolist() == [True, True, True, True, False, False, False, True]


def test_temporal_keep_compares_with_the_frame_that_last_kept_each_place():
    # one video of 3 frames x 2 places: place 0 repeats, place 1 changes in frame 1 then stays
    layout = build_layout(
        torch.tensor([[1, 7, 7, 7, 7, 7, 7, 2]]),
        family="test",
        image_token=None,
        video_token=7,
        video_chunks=[[2, 2, 2]],
    )
    a, b, c = torch.eye(3)
    embeds = torch.stack([torch.zeros(3), a, b, a, c, a, c, torch.zeros(3)])[None]
    keep, _ = temporal_keep(embeds, layout, 0.9)
    assert keep[0].tolist() == [True, True, True, False, True, False, False, True]
    # "mean": place 0's later tokens differ a little (cosine 0.98 and 0.995 to the first: still merged), and the
    # reference becomes the group's average; place 1's kept c and the c it absorbs average to c
    near = torch.stack([torch.zeros(3), a, b, a + 0.2 * b, c, a + 0.1 * c, c, torch.zeros(3)])[None]
    merged, mean = temporal_keep(near, layout, 0.9, mode="mean")
    assert torch.equal(merged, keep)
    torch.testing.assert_close(mean[0, 1], a + (0.2 * b + 0.1 * c) / 3)
    torch.testing.assert_close(mean[0, 4], c)
    assert torch.equal(mean[0, [0, 2, 7]], near[0, [0, 2, 7]])  # tokens that absorbed nothing are left as they were
    assert frame_sequences(layout, 0)[0][1].tolist() == [3, 4]


def test_compact_pads_short_rows_on_the_left():
    keep = torch.tensor([[False, True, False, True, True], [True, True, True, True, False]])
    valid = torch.tensor([[False, True, True, True, True], [True, True, True, True, True]])
    idx, holds = compact(keep, valid)
    assert idx.tolist() == [[0, 1, 3, 4], [0, 1, 2, 3]]  # row 0 takes its padding slot first
    assert holds.tolist() == [[False, True, True, True], [True, True, True, True]]


@pytest.mark.parametrize("threshold", [0.9, 1.0])  # 1.0: identical tokens merge though fp32 cosines fall short of 1
@pytest.mark.parametrize("family", ["llava", *VIDEO_FAMILIES])
def test_temporal_merge_of_identical_frames_keeps_one_frame(tiny_model, family, threshold):
    model = tiny_model(family)
    ex = _static_video(model, family)
    layout = layout_from_inputs(model.config, ex.inputs)
    spans = [s for s in layout.samples[0].spans if s.frame >= 0 or s.modality == Modality.IMAGE]
    merged_expected = sum(len(s) for s in spans) - len(spans[0]) if family != "llava" else len(spans[1])
    _, session = _generate(model, ex.inputs, Full(temporal_merge=threshold), max_new_tokens=3)
    stats = session.prefill_stats
    assert sum(stats.merged.values()) == merged_expected
    n = ex.inputs["input_ids"].shape[1]
    assert stats.layers[0].slots == n - merged_expected  # the model never saw them
    assert session.last_cache.get_seq_length() == n + 2  # the logical length still counts every prompt token


# Gemma 3 is refused (tested above); LLaVA-NeXT's image-newline embeddings repeat exactly from image to image, so
# they merge even between random images
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in ("gemma3", "llava_next")])
def test_temporal_merge_that_merges_nothing_is_token_identical(tiny_model, family):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs  # random pixels: no two tokens alike
    plain = _generate(model, inputs, max_new_tokens=8)
    out, session = _generate(model, inputs, Full(temporal_merge=1.0), max_new_tokens=8)
    assert torch.equal(out, plain)
    assert session.prefill_stats.merged == {}


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video"])
def test_temporal_merge_equals_masking_the_merged_tokens_out(tiny_model, family):
    """The prompt's logits with tokens merged away = a plain forward that masks exactly those tokens out and keeps
    every position: merging changes what the model sees, nothing else."""
    model = tiny_model(family)
    inputs = _static_video(model, family).inputs
    with vlcache.compress(model, Full(temporal_merge=0.9)) as session:
        cache = session.new_cache()
        with torch.no_grad():
            merged = model(**inputs, **cache_kwargs(cache), use_cache=True).logits[:, -1]
    kept = cache.source_positions[0]
    n = inputs["input_ids"].shape[1]
    assert len(kept) < n
    mask = torch.zeros_like(inputs["attention_mask"])
    mask[0, kept] = 1
    with torch.no_grad():
        reference = model(**{**inputs, "attention_mask": mask}, position_ids=torch.arange(n)[None]).logits[:, -1]
    torch.testing.assert_close(merged, reference, atol=1e-4, rtol=1e-4)


def test_temporal_merge_keeps_m_rope_positions(tiny_model):
    """Qwen2-VL: the rotary tables of the merged sequence are the whole prompt's at the kept positions (the
    temporal index of a kept frame token included)."""
    model = tiny_model("qwen2_vl")
    inputs = _static_video(model, "qwen2_vl").inputs
    plain, h = _capture_layer_inputs(model, 0)
    try:
        _generate(model, inputs, max_new_tokens=1)
    finally:
        h.remove()
    with vlcache.compress(model, Full(temporal_merge=0.9)) as session:
        merged, h = _capture_layer_inputs(model, 0)
        try:
            model.generate(**inputs, max_new_tokens=1, **GREEDY)
        finally:
            h.remove()
    kept = session.last_cache.source_positions[0]
    assert merged["n"] == len(kept) < plain["n"]
    for a, b in zip(plain["pe"], merged["pe"]):
        torch.testing.assert_close(b, a[..., kept, :])


def test_padded_batch_with_temporal_merge_equals_each_prompt_alone(tiny_model):
    model = tiny_model("llava_onevision")
    one = _static_video(model, "llava_onevision", frames=4).inputs
    policy = SnapKV(vision_budget=0.5, window=4, temporal_merge=0.9)
    alone, _ = _generate(model, one, policy, max_new_tokens=5, min_new_tokens=5)
    rows = [["ab", testing.Video(4), "what?"], ["abcdefgh", testing.Video(4), "what?"]]
    batch = testing.make_inputs(model, rows).inputs
    batch["pixel_values_videos"][0] = one["pixel_values_videos"][0]
    pv = batch["pixel_values_videos"]
    pv[1, 1:] = pv[1, :1]
    together, session = _generate(model, batch, policy, max_new_tokens=5, min_new_tokens=5)
    n, n1 = batch["input_ids"].shape[1], one["input_ids"].shape[1]
    assert torch.equal(together[0, n:], alone[0, n1:])
    assert session.prefill_stats.merged["video"] > 0


def test_temporal_merge_with_prune_at_and_stats(tiny_model):
    model = tiny_model("qwen2_vl")
    ex = _static_video(model, "qwen2_vl")
    policy = make_policy("vlcache", vision_budget=0.5, prune_at=0, temporal_merge=0.9)
    rows = []  # the prompt rows each attention layer computes at the prefill (its first call)
    hooks = [
        m.register_forward_pre_hook(lambda _, args, kw: rows.append(kw["hidden_states"].shape[1]), with_kwargs=True)
        for m in attention_modules(model)[:2]
    ]
    try:
        _, session = _generate(model, ex.inputs, policy, max_new_tokens=4)
    finally:
        for h in hooks:
            h.remove()
    # merging shortens what enters the model; the cut after layer 0 shortens what layer 1 computes again
    assert rows[0] < ex.inputs["input_ids"].shape[1] and rows[1] < rows[0], rows[:2]
    stats = session.prefill_stats
    assert stats.merged["video"] > 0 and "merged before the model" in stats.summary()
    assert stats.to_dict()["merged"] == stats.merged
    positions = session.prefill_positions[1]
    n = ex.inputs["input_ids"].shape[1]
    assert int(positions.max()) < n  # reported in the prompt's own positions
    kept_video = layout_from_inputs(model.config, ex.inputs).modality[0, positions[0, 0]] == Modality.VIDEO
    assert int(kept_video.sum()) > 0


def test_random_policy_takes_the_new_settings_too():
    assert (
        Random(budget=0.5, prune_at=1, temporal_merge=0.8, temporal_mode="mean").settings()["temporal_mode"] == "mean"
    )


def test_image_reuse_with_prefill_cuts_is_refused(tiny_model):
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, ["ab", testing.IMAGE, "what?"]).inputs
    store = vlcache.ImageKVStore(max_bytes=1 << 24)
    for policy in (SnapKV(budget=0.5, prune_at=0), Full(temporal_merge=0.9)):
        with vlcache.compress(model, policy), vlcache.reuse(model, store):
            with pytest.raises(ValueError, match="image reuse recomputes only part of the prompt"):
                model.generate(**inputs, max_new_tokens=2, do_sample=False)
