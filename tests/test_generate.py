"""vlcache inside Hugging Face `generate`, on tiny models of every family."""

import contextlib

import pytest
import torch
from transformers import DynamicCache
from util import FAMILIES, prompt_for

import vlcache
from vlcache import testing
from vlcache.hf import CompressedCache, CompressibleLayer
from vlcache.hf.compat import cache_kwargs, get_cache
from vlcache.hf.model_parts import decoder
from vlcache.modality import layout_from_inputs
from vlcache.policies import CAKE, H2O, ElasticCache, Full, PyramidKV, Random, SnapKV, StreamingLLM

GREEDY = dict(do_sample=False)


def _generate(model, inputs, policy=None, **kw):
    return _run(model, inputs, policy, **kw)[0]


def _run(model, inputs, policy=None, **kw):
    """(generated ids, the session: None without a policy)."""
    if policy is None:
        return model.generate(**inputs, **GREEDY, **kw), None
    with vlcache.compress(model, policy) as session:
        return model.generate(**inputs, **GREEDY, **kw), session


def _assert_compressed(session, compressed=True):
    """The prefill really cut the cache (a compressing policy), or held every entry (Full): the tests comparing a
    compressed run with a plain one would otherwise pass with no compression at all."""
    ratio = session.prefill_stats.kv_ratio
    assert (ratio < 1.0) if compressed else (ratio == 1.0), ratio


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_token_identical(tiny_model, family):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    plain = _generate(model, inputs, max_new_tokens=12)
    assert torch.equal(_generate(model, inputs, Full(), max_new_tokens=12), plain)
    assert torch.equal(_generate(model, inputs, SnapKV(budget=1.0), max_new_tokens=12), plain)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3", "llava_onevision"])
def test_keep_all_is_token_identical_under_eager(tiny_model, family):
    model = tiny_model(family)
    model.set_attn_implementation("eager")
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    plain = _generate(model, inputs, max_new_tokens=10)
    assert torch.equal(_generate(model, inputs, Full(), max_new_tokens=10), plain)
    with vlcache.compress(model, SnapKV(vision_budget=0.5)) as s:
        out = model.generate(**inputs, max_new_tokens=4, output_attentions=True, return_dict_in_generate=True, **GREEDY)
    assert s.prefill_stats.kv_ratio < 1.0
    # eager attention really ran over the cut cache: it returns its weights (sdpa returns none), and the first
    # decode step's weights span each compressed layer's kept slots plus the new token, not the whole prompt
    step = out.attentions[1]
    for layer in s.prefill_stats.layers:
        assert layer.slots < inputs["input_ids"].shape[1]
        assert step[layer.layer].shape[-1] == layer.slots + 1
        torch.testing.assert_close(step[layer.layer].sum(-1), torch.ones(step[layer.layer].shape[:-1]))
    assert model.config.get_text_config()._attn_implementation == "eager"  # restored


@pytest.mark.parametrize("family", FAMILIES)
def test_half_vision_budget_gives_exact_cache_length(tiny_model, family):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    counts = layout_from_inputs(model.config, inputs).counts()
    n_text, n_vision = counts["text"], counts["image"] + counts["video"]
    with vlcache.compress(model, SnapKV(vision_budget=0.5)) as session:
        cache = session.new_cache()
        model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=1, **GREEDY)
    layers = [layer for layer in cache.layers if isinstance(layer, CompressibleLayer)]
    assert layers, "every family has at least one full-attention layer"
    for layer in layers:
        assert layer.physical_length == n_text + n_vision // 2
        assert layer.keys.shape[2] == layer.values.shape[2] == layer.positions.shape[2]
    # sliding-window layers (Gemma 3) are left alone
    for layer in cache.layers:
        if not isinstance(layer, CompressibleLayer):
            assert layer.keys.shape[2] == min(layer.cumulative_length, layer.sliding_window - 1)


def _positions_seen(model, inputs, policy, steps):
    """(rotary positions of every forward, the session)."""
    log, (_, session) = _positions_during(
        model, lambda: _run(model, inputs, policy, max_new_tokens=steps, min_new_tokens=steps)
    )
    return log, session


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_positions_match_uncompressed_run(tiny_model, family):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    plain, _ = _positions_seen(model, inputs, None, 6)
    squeezed, session = _positions_seen(model, inputs, SnapKV(budget=0.3, window=4), 6)
    _assert_compressed(session)
    assert len(plain) == len(squeezed) >= 6  # Gemma 3 calls its rotary embedding twice a step
    for a, b in zip(plain, squeezed):
        assert torch.equal(a, b)


def _decode_position(model, logical):
    if model.config.model_type.startswith("qwen"):  # M-RoPE: text positions shifted by the prompt's rope delta
        return torch.full((3, 1, 1), logical) + model.model.rope_deltas.view(1, -1, 1)
    return torch.tensor([[logical]])


def _masked_reference_logits(model, inputs, keep, steps):
    """Uncompressed HF run where the dropped prompt tokens are masked out of every full-attention layer."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(**inputs, **cache_kwargs(cache), use_cache=True)
        logits = [out.logits[:, -1]]
        n = keep.shape[0]
        for s in range(steps):
            tok = logits[-1].argmax(-1, keepdim=True)
            cols = torch.cat([keep, torch.ones(s + 1, dtype=torch.bool)])[None, None, None, :]
            mask = cols
            if model.config.model_type == "gemma3":
                mask = {"full_attention": cols, "sliding_attention": torch.ones_like(cols)}
            out = model(
                input_ids=tok,
                **cache_kwargs(cache),
                attention_mask=mask,
                position_ids=_decode_position(model, n + s),
                use_cache=True,
            )
            logits.append(out.logits[:, -1])
    return logits


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_masked_uncompressed_run(tiny_model, family):
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    steps = 4
    # one random choice shared by all heads and layers, so a single 4-D mask can express it
    with vlcache.compress(model, Random(vision_budget=0.5, shared=True, seed=3)) as session:
        cache = session.new_cache()
        out = model.generate(
            **inputs,
            **cache_kwargs(cache),
            max_new_tokens=steps,
            min_new_tokens=steps,
            output_logits=True,
            return_dict_in_generate=True,
            **GREEDY,
        )
    layer = next(layer for layer in cache.layers if isinstance(layer, CompressibleLayer))
    n = inputs["input_ids"].shape[1]
    kept = layer.positions[0, 0]
    kept = kept[kept < n]
    assert 0 < kept.numel() < n
    keep = torch.zeros(n, dtype=torch.bool)
    keep[kept] = True
    ref = _masked_reference_logits(model, inputs, keep, steps - 1)
    for got, want in zip(out.logits, ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


BATCH_POLICIES = [
    Full(),
    SnapKV(budget=0.5, window=4),
    SnapKV(vision_budget=0.3, window=4),
    PyramidKV(budget=0.5, window=4),
    H2O(budget=0.4),
    StreamingLLM(budget=0.3),
    Random(budget=0.5),
]


# the video family runs in the full suite only: the fast set keeps a flat grid and M-RoPE
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", pytest.param("llava_onevision", marks=pytest.mark.slow)])
@pytest.mark.parametrize("policy", BATCH_POLICIES, ids=lambda p: f"{p.name}")
def test_left_padded_batch_equals_each_prompt_alone(tiny_model, family, policy):
    model = tiny_model(family)
    rows = [["ab", testing.IMAGE, "what is it?"], ["xyzw vv", testing.IMAGE, "tell me more about it"]]
    batch, session = _run(model, testing.make_inputs(model, rows).inputs, policy, max_new_tokens=10)
    _assert_compressed(session, policy.name != "full")
    for b, row in enumerate(rows):
        alone, session = _run(model, testing.make_inputs(model, [row], seed=b).inputs, policy, max_new_tokens=10)
        _assert_compressed(session, policy.name != "full")
        assert batch[b, -10:].tolist() == alone[0, -10:].tolist()


SHORT_PAIR = [["a b c", testing.IMAGE, "tell me more about it please"], ["x", testing.IMAGE, "what?"]]


@pytest.mark.parametrize("pair", ["long-short", "two-short"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_elastic_cache_rows_of_a_padded_batch_decode_as_alone(tiny_model, family, pair):
    """Three batch-wide shortcuts made a padded row drift from the same prompt alone: the fixed point was one slot
    index for the whole batch; every row dropped as many slots as the row that wanted most (its real tokens when it
    had no padding to give); and the prefill merged no row when one row had no anchor (two short prompts). Now
    the point counts each row's real slots, a row's extra deletions are dead filler, and each row merges alone."""
    model = tiny_model(family)
    rows = [prompt_for(family), ["x", testing.IMAGE, "what?"]] if pair == "long-short" else SHORT_PAIR
    policy = ElasticCache(budget=0.6)
    batch, session = _run(model, testing.make_inputs(model, rows).inputs, policy, max_new_tokens=8, min_new_tokens=8)
    _assert_compressed(session)
    for b, row in enumerate(rows):
        alone = _generate(
            model, testing.make_inputs(model, [row], seed=b).inputs, policy, max_new_tokens=8, min_new_tokens=8
        )
        assert batch[b, -8:].tolist() == alone[0, -8:].tolist(), b


@pytest.mark.parametrize("cascading", [True, False])
def test_cake_leaves_a_batch_row_that_fits_whole_as_it_does_alone(tiny_model, cascading):
    """CAKE leaves a prompt that fits its budget plus its window untouched, but decided that for the whole batch:
    next to a longer prompt, a short one was cut (and evicted from while decoding). Now each row is decided alone."""
    model = tiny_model("qwen2_vl")
    rows = [prompt_for("qwen2_vl"), ["x", testing.IMAGE, "what?"]]
    policy = CAKE(budget=0.4, cascading=cascading)
    short = testing.make_inputs(model, [rows[1]], seed=1).inputs
    n = int(short["input_ids"].shape[1])
    assert n <= int(0.4 * n) + policy.window < testing.make_inputs(model, [rows[0]]).inputs["input_ids"].shape[1]
    batch, session = _run(model, testing.make_inputs(model, rows).inputs, policy, max_new_tokens=6, min_new_tokens=6)
    _assert_compressed(session)
    row = session.prefill_rows[1]  # the short row: every token kept in every layer
    assert all(layer.kept["text"] + layer.kept["image"] == n for layer in row.layers)
    for b, prompt in enumerate(rows):
        alone = _generate(
            model, testing.make_inputs(model, [prompt], seed=b).inputs, policy, max_new_tokens=6, min_new_tokens=6
        )
        assert batch[b, -6:].tolist() == alone[0, -6:].tolist(), b


def test_frame_minimum_ties_fall_as_in_every_other_selection(tiny_model):
    """SnapKV scores its window +inf, so a frame's top `frame_min` can tie: topk broke those ties in an order that
    depended on the row's padding, and a padded row kept other slots than alone. Ties go to the lower position."""
    model = tiny_model("llava")
    rows = [prompt_for("llava"), ["x", testing.IMAGE, "what?"]]
    policy = SnapKV(vision_budget=0.2, frame_min=2)
    batch, session = _run(model, testing.make_inputs(model, rows).inputs, policy, max_new_tokens=6)
    _assert_compressed(session)
    for b, row in enumerate(rows):
        alone = _generate(model, testing.make_inputs(model, [row], seed=b).inputs, policy, max_new_tokens=6)
        assert batch[b, -6:].tolist() == alone[0, -6:].tolist(), b


@pytest.mark.slow
@pytest.mark.parametrize("policy", [SnapKV(budget=0.3), H2O(budget=0.3), StreamingLLM(budget=32)], ids=lambda p: p.name)
def test_long_generation(tiny_model, policy):
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    n = inputs["input_ids"].shape[1]
    with vlcache.compress(model, policy) as session:
        out = model.generate(**inputs, max_new_tokens=300, min_new_tokens=300, **GREEDY)
    assert out.shape[1] == n + 300
    final = session.stats
    assert all(s.seen == n + 299 for s in final.layers)  # the last token is sampled, never cached
    kept_after_prefill = session.prefill_stats.layers[0].slots
    if policy.name == "snapkv":  # prefill only: grows by one per step
        assert final.layers[0].slots == kept_after_prefill + 299
    else:  # held at the budget while decoding
        assert final.layers[0].slots == kept_after_prefill


def test_h2o_cache_stays_at_budget_every_step(tiny_model):
    model = tiny_model("qwen2_vl")
    inputs = testing.make_inputs(model, prompt_for("qwen2_vl")).inputs
    sizes = []
    with vlcache.compress(model, H2O(budget=0.4)) as session:
        cache = session.new_cache()
        handle = model.register_forward_hook(
            lambda *a: sizes.append([cache.physical_length(i) for i in cache.compressible()])
        )
        try:
            model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=12, min_new_tokens=12, **GREEDY)
        finally:
            handle.remove()
    n = inputs["input_ids"].shape[1]
    budget = int(0.4 * n)
    assert len(sizes) == 12 and sizes[0], "one reading per forward, of at least one compressible layer"
    assert all(s == [budget] * len(sizes[0]) for s in sizes)


@pytest.mark.parametrize("policy", [H2O, StreamingLLM, CAKE], ids=lambda p: p.name)
def test_evict_every_k_drops_the_k_lowest_scores_every_k_steps(tiny_model, policy):
    """evict_every=4: the cache runs 0-3 tokens over its budget and, every fourth token, the four lowest-scoring
    slots that are not forced (recent, sinks, protected) leave at once."""
    model = tiny_model("qwen2_vl")
    inputs = testing.make_inputs(model, prompt_for("qwen2_vl")).inputs
    pol = policy(budget=0.4, evict_every=4) if policy is not CAKE else CAKE(budget=0.4, window=4, evict_every=4)
    calls = []
    keep_at_budget = pol.keep_at_budget

    def spy(view, budget, scores, forced):
        out = keep_at_budget(view, budget, scores, forced)
        calls.append((scores.clone(), (forced & view.slot_valid).clone(), out[view.layer]))
        return out

    pol.keep_at_budget = spy
    sizes = []
    with vlcache.compress(model, pol) as session:
        cache = session.new_cache()
        handle = model.register_forward_hook(lambda *a: sizes.append(cache.physical_length(cache.compressible()[0])))
        try:
            model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=12, min_new_tokens=12, **GREEDY)
        finally:
            handle.remove()
    held = sizes[0]  # after the prefill; then forwards 1..11 each append one token
    assert sizes == [held + i % 4 for i in range(12)]
    assert len(calls) == 2 * len(cache.compressible())  # evictions at the 4th and 8th appended token only
    for scores, forced, sel in calls:
        gone = sel.slots if hasattr(sel, "slots") else _dropped(sel.indices, scores.shape[-1])
        s = scores.float().masked_fill(forced, float("inf"))
        lowest = s.topk(4, dim=-1, largest=False).indices
        assert gone.shape[-1] == 4
        assert torch.equal(gone.sort(-1).values, lowest.sort(-1).values)


def _dropped(kept: torch.Tensor, T: int) -> torch.Tensor:
    """[B, Hk, T - K] the slots a Selection did not keep."""
    mask = torch.ones(*kept.shape[:-1], T, dtype=torch.bool).scatter_(-1, kept, False)
    return mask.nonzero()[:, -1].view(*kept.shape[:-1], -1)


def test_evict_every_rejects_bad_values():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="evict_every"):
            H2O(budget=0.2, evict_every=bad)


def _positions_during(model, fn):
    rotary = decoder(model).rotary_emb
    log = []

    def hook(mod, args, kwargs, out):
        log.append(kwargs.get("position_ids", args[1] if len(args) > 1 else None).clone())

    handle = rotary.register_forward_hook(hook, with_kwargs=True)
    try:
        out = fn()
    finally:
        handle.remove()
    return log, out


def _two_turns(model, ex, policy):
    """Generate, append a follow-up question, generate again on the same cache. Returns (positions, output)
    of the second turn."""
    follow = torch.tensor([testing.text_ids(" and then?")])
    with vlcache.compress(model, policy) if policy else contextlib.nullcontext() as session:
        cache = session.new_cache() if session else DynamicCache(config=model.config)
        first = model.generate(**ex.inputs, **cache_kwargs(cache), max_new_tokens=5, min_new_tokens=5, **GREEDY)
        ids = torch.cat([first, follow], dim=1)
        grown = ids.shape[1] - ex.inputs["input_ids"].shape[1]
        # the images are already in the cache: the next turn sends token ids only, as a chat client would
        mm = torch.cat([ex.inputs["mm_token_type_ids"], torch.zeros(1, grown, dtype=torch.int)], 1)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": mm}
        positions, out = _positions_during(
            model, lambda: model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=5, min_new_tokens=5, **GREEDY)
        )
        if session:
            _assert_compressed(session, policy.name != "full")
        return positions, out


def test_second_turn_keeps_positions_and_keep_all_matches_plain(tiny_model):
    model = tiny_model("qwen2_vl")
    ex = testing.make_inputs(model, prompt_for("qwen2_vl"))
    plain_pos, plain_out = _two_turns(model, ex, None)
    full_pos, full_out = _two_turns(model, ex, Full())
    snap_pos, _ = _two_turns(model, ex, SnapKV(budget=0.3, window=4))
    assert torch.equal(full_out, plain_out)
    assert len(plain_pos) == len(full_pos) == len(snap_pos) == 5
    for a, b, c in zip(plain_pos, full_pos, snap_pos):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert plain_pos[0].shape[-1] > 1  # the second turn's new tokens arrive as one multi-token forward


def test_memory_really_shrinks(tiny_model):
    model = tiny_model("llava_onevision")
    inputs = testing.make_inputs(model, prompt_for("llava_onevision")).inputs
    with vlcache.compress(model, SnapKV(budget=0.25)) as session:
        cache = session.new_cache()
        model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=1, **GREEDY)
    n = inputs["input_ids"].shape[1]
    stats = session.prefill_stats
    per_token = stats.kv_bytes_full // (2 * n)  # 2 layers
    assert stats.kv_bytes == 2 * int(0.25 * n) * per_token
    assert cache.nbytes() == stats.kv_bytes
    for layer in cache.layers:  # the tensors themselves are small, not views of the full ones
        assert layer.keys.untyped_storage().nbytes() == layer.keys.numel() * layer.keys.element_size()


def test_stats_report_modalities(tiny_model):
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    with vlcache.compress(model, SnapKV(vision_budget=0.25)):
        model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, **GREEDY)
    stats = vlcache.last_stats(model)
    counts = layout_from_inputs(model.config, inputs).counts()
    assert stats.prompt == counts
    assert len(stats.layers) == model.config.get_text_config().num_hidden_layers  # every layer, each full attention
    for layer in stats.layers:
        assert layer.kept["text"] == counts["text"]
        assert layer.kept["image"] == counts["image"] // 4
        assert layer.kept["generated"] == 2
    summary, table = stats.summary(), stats.table().splitlines()
    assert f"text {counts['text']}/{counts['text']}" in summary
    assert f"image {counts['image'] // 4}/{counts['image']}" in summary
    assert f"({100 * (1 - stats.kv_ratio):.1f}% saved)" in summary and stats.kv_ratio < 1
    assert len(table) == 1 + len(stats.layers) and table[1].split()[0] == "0"


def test_model_is_restored_after_the_block(tiny_model):
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    plain = _generate(model, inputs, max_new_tokens=6)
    with vlcache.compress(model, SnapKV(budget=0.2)):
        pass
    assert "generate" not in model.__dict__
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    assert torch.equal(_generate(model, inputs, max_new_tokens=6), plain)


def test_vlcache_cache_outside_generate_with_manual_forward(tiny_model):
    """A manual loop works too: the prompt forward compresses, decode forwards take explicit positions."""
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    n = inputs["input_ids"].shape[1]
    with vlcache.compress(model, SnapKV(budget=0.5)) as session:
        cache = session.new_cache()
        with torch.no_grad():
            out = model(**inputs, **cache_kwargs(cache), use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            out2 = model(input_ids=tok, **cache_kwargs(cache), position_ids=torch.tensor([[n]]), use_cache=True)
    assert isinstance(cache, CompressedCache) and cache.prefilled
    assert cache.physical_length(0) == int(0.5 * n) + 1
    expect = _generate(model, inputs, SnapKV(budget=0.5), max_new_tokens=2)[0, -1]
    assert out2.logits[0, -1].argmax() == expect


def test_appends_fill_a_buffer_and_match_concatenation():
    """Decode steps write into reserved room (one reallocation per GROW steps) and the layer's keys always equal
    the plain concatenation, across a compaction, a crop-free reorder and growth past the reserve."""
    torch.manual_seed(0)
    layer = CompressibleLayer()
    k0, v0 = torch.randn(1, 2, 10, 4), torch.randn(1, 2, 10, 4)
    layer.update(k0, v0)
    ks, vs = [k0], [v0]
    ptrs = set()
    for step in range(CompressibleLayer.GROW + 5):
        if step == 7:  # compaction replaces the tensors: the next append reallocates from the kept entries
            from vlcache.policies.view import Selection

            keep = torch.tensor([[[0, 3, 5, 8]] * 2])
            layer.compact(Selection(keep))
            ks = [torch.cat(ks, -2).gather(2, keep[..., None].expand(1, 2, 4, 4))]
            vs = [torch.cat(vs, -2).gather(2, keep[..., None].expand(1, 2, 4, 4))]
        k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
        out_k, out_v = layer.update(k, v)
        ks.append(k)
        vs.append(v)
        assert torch.equal(out_k, torch.cat(ks, -2)) and torch.equal(out_v, torch.cat(vs, -2))
        ptrs.add(layer._kbuf.data_ptr())
    assert len(ptrs) <= 4  # first append, after the compaction, once past the reserve (not once per step)
    assert layer.seen == 10 + CompressibleLayer.GROW + 5


def _by_position(layer):
    """(positions, keys, values, state) of a layer with its slots sorted by position, per row and head."""
    order = layer.slot_positions().argsort(-1)
    kv = [t.gather(2, order[..., None].expand(*order.shape, t.shape[-1])) for t in (layer.keys, layer.values)]
    state = {k: t.gather(-1, order) for k, t in layer.slot_state.items()}
    return layer.slot_positions().gather(-1, order), *kv, state


@pytest.mark.parametrize("e", [1, 3, 6])
def test_evict_in_place_keeps_what_compaction_keeps(e):
    """Filling holes from the tail leaves the same entries as compacting to the survivors, only in another slot
    order, and the layer stays a view of its append buffer (the next token appends without reallocating)."""
    from vlcache.policies.view import Eviction, Selection

    torch.manual_seed(1)
    layers = [CompressibleLayer(), CompressibleLayer()]
    k0, v0 = torch.randn(2, 3, 12, 4), torch.randn(2, 3, 12, 4)
    for layer in layers:
        layer.update(k0, v0)
        layer.update(torch.randn(2, 3, 1, 4).fill_(7.0), torch.zeros(2, 3, 1, 4))  # the buffer, as in decode
        layer.slot_state["score"] = torch.rand(2, 3, 13)
    layers[1].slot_state = dict(layers[0].slot_state)
    drop = torch.rand(2, 3, 13).argsort(-1)[..., :e]  # any E slots per row and head, the newest included
    kept = torch.ones(2, 3, 13, dtype=torch.bool).scatter_(-1, drop, False)
    layers[0].compact(Selection(torch.arange(13).expand(2, 3, 13)[kept].view(2, 3, 13 - e)))
    buffer = layers[1]._kbuf.data_ptr()
    layers[1].evict(Eviction(drop))
    compacted, in_place = _by_position(layers[0]), _by_position(layers[1])
    for a, b in zip(compacted[:3], in_place[:3]):
        assert torch.equal(a, b)
    assert torch.equal(compacted[3]["score"], in_place[3]["score"])
    assert layers[1].physical_length == 13 - e and layers[1].keys.data_ptr() == buffer
    layers[1].update(torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4))
    assert layers[1]._kbuf.data_ptr() == buffer and layers[1].positions[..., -1].eq(13).all()


@pytest.mark.parametrize("policy", [H2O(budget=0.3), StreamingLLM(budget=0.3)], ids=lambda p: p.name)
def test_in_place_eviction_decodes_like_compaction(tiny_model, policy):
    """H2O and StreamingLLM evict in place while decoding (their scores ignore slot order): the same tokens, the
    same logits and the same kept positions as the compacting path."""
    model = tiny_model("qwen2_vl")
    inputs = testing.make_inputs(model, prompt_for("qwen2_vl")).inputs
    runs = []
    for order_free in (True, False):
        compacting = type(policy)(**policy.settings())
        compacting.order_free = order_free  # an instance attribute shadows the class's
        with vlcache.compress(model, compacting) as session:
            out = model.generate(
                **inputs,
                max_new_tokens=20,
                min_new_tokens=20,
                output_logits=True,
                return_dict_in_generate=True,
                **GREEDY,
            )
        layers = [session.last_cache.layers[i] for i in session.last_cache.compressible()]
        runs.append((out, layers))
    (fast, fast_layers), (slow, slow_layers) = runs
    assert torch.equal(fast.sequences, slow.sequences)
    for a, b in zip(fast.logits, slow.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(fast_layers, slow_layers):
        assert torch.equal(_by_position(a)[0], b.slot_positions())
    # the fast path really ran: its slots are out of sequence order, the compacting path's are not
    assert any(bool((a.slot_positions().diff(dim=-1) < 0).any()) for a in fast_layers)


def test_per_row_stats_and_kept_positions_are_worked_out_when_read(tiny_model, monkeypatch):
    """A compressed generate works out neither the per-row stats nor the CPU copies of the kept positions (only the
    apps read them); read afterwards, they are what the cache held right after the prefill, though decoding has
    evicted prompt entries since."""
    model = tiny_model("qwen2_vl")
    rows = [["ab", testing.IMAGE, "what is it?"], ["xyzw vv", testing.IMAGE, "tell me more about it"]]
    inputs = testing.make_inputs(model, rows).inputs  # two rows of different lengths: left-padded
    calls, counting = [], [True]
    for name in ("row_stats", "original_positions"):
        real = getattr(CompressedCache, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            if counting[0]:
                calls.append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(CompressedCache, name, counted)
    seen = {}

    def right_after_prefill(module, args, kwargs, output):  # runs after the session's own hook, registered first
        cache = get_cache(kwargs)
        if cache.prefilled and not seen:
            counting[0] = False
            seen["rows"] = [cache.stats(session.label(), row=b) for b in range(2)]
            seen["positions"] = {
                i: cache.original_positions(cache.layers[i].slot_positions()).clone() for i in cache.compressible()
            }
            counting[0] = True

    # nothing protected: each new token pushes the oldest prompt entry after the sinks out
    with vlcache.compress(model, StreamingLLM(budget=0.4, protect=())) as session:
        handle = model.register_forward_hook(right_after_prefill, with_kwargs=True)
        try:
            model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, **GREEDY)
        finally:
            handle.remove()
    assert calls == []
    assert seen["positions"] and session.prefill_stats.layers, "the hook saw the prefilled cache's layers"
    cache = session.last_cache
    for i, kept in seen["positions"].items():  # the sliding window has moved on: the prefill's entries are gone
        assert not torch.equal(cache.layers[i].slot_positions()[..., : kept.shape[-1]], kept)
    assert session.prefill_rows == seen["rows"]
    assert calls.count("row_stats") == 2
    assert session.prefill_positions.keys() == seen["positions"].keys()
    for i, kept in seen["positions"].items():
        assert session.prefill_positions[i].device.type == "cpu"
        assert torch.equal(session.prefill_positions[i], kept.cpu())
    total = session.prefill_stats
    for layer, *per_row in zip(total.layers, *(r.layers for r in session.prefill_rows)):
        for m in ("text", "image", "video"):  # the rows' kept tokens add up to the whole batch's
            assert sum(r.kept[m] for r in per_row) == layer.kept[m]
    assert sum(r.kv_bytes for r in session.prefill_rows) == total.kv_bytes
    assert session.prefill_rows is session.prefill_rows  # worked out once
