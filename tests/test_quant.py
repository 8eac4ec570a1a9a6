"""KV quantization per modality: the quantizer's error bound, the full-precision window rolling over, bytes that are
the tensors' real storage, bad settings, and every policy generating over a quantized cache."""

import numpy as np
import pytest
import torch
from util import IMG_ID, layout_from_ids, prompt_for, run_policy

import vlcache
from vlcache import testing
from vlcache.hf.policy_runner import PolicyRunner
from vlcache.hf.quantized import QuantizedLayer
from vlcache.kernels import reference as ref
from vlcache.policies import POLICIES, Full, SnapKV, make_policy
from vlcache.quant import dequantize, pack, quantize, unpack

GREEDY = dict(do_sample=False)


def _scale_per_entry(t):
    """[B, Hk, N, d] the stored scale each entry was quantized with."""
    B, H, N = t.codes.shape[:3]
    d = t.dim
    if t.axis == "channel":
        return t.scale.float().gather(2, t.group_index()[..., None].expand(B, H, N, d))
    return t.scale.float().repeat_interleave(t.group, dim=-1)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axis", ["channel", "token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantized_entries_are_within_half_their_group_scale(bits, axis, dtype):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(2, 3, 63, 60, generator=g) * torch.rand(60, generator=g) * 4).to(dtype)  # uneven channels
    valid = torch.rand(2, 3, 63, generator=g) > 0.2
    x[~valid] = 1e4  # an invalid slot (padding, filler) must not stretch any group's range
    t = quantize(x, bits, 12, axis, valid)
    assert t.codes.dtype == torch.uint8 and t.codes.shape == (2, 3, 63, 60 * bits // 8)  # really packed
    assert t.scale.dtype == (torch.float16 if dtype == torch.float32 else dtype)
    err = (dequantize(t) - x.float()).abs()
    bound = _scale_per_entry(t) / 2
    assert bool((err <= bound * (1 + 1e-5) + 1e-6)[valid].all())
    assert float(bound[valid].max()) < 4 * 8 / (2**bits - 1)  # the outliers did not widen the ranges
    assert torch.equal(unpack(t.codes, bits), unpack(pack(unpack(t.codes, bits), bits), bits))


def test_bad_settings_name_the_valid_values(tiny_model):
    with pytest.raises(ValueError, match="16, 8, 4, 2"):
        Full(vision_bits=3)
    with pytest.raises(ValueError, match="16, 8, 4, 2"):
        SnapKV(budget=0.5, text_bits=1)
    with pytest.raises(ValueError, match="'channel', 'token'"):
        Full(text_bits=4, value_axis="row")
    with pytest.raises(ValueError, match="quant_residual"):
        Full(text_bits=4, quant_residual=-1)
    model = tiny_model("llava")  # head dim 16
    with pytest.raises(ValueError, match="valid group sizes: 1, 2, 4, 8, 16"):
        vlcache.attach(model, Full(vision_bits=4, quant_group=12))  # when attached, before any generate


IDS = [1, 5, 6] + [IMG_ID] * 20 + [7, 8] + [IMG_ID] * 9 + list(range(10, 16))


def _decode(cache, steps, policy=None, B=1, H=4, Hk=2, d=8, seed=1):
    """Append single tokens as generate does (and run the policy's decode hook); returns the appended (keys,
    values) per step."""
    g = torch.Generator().manual_seed(seed)
    runner = PolicyRunner(policy, H) if policy is not None else None
    out = []
    for _ in range(steps):
        cache.extend(torch.ones(B, 1, dtype=torch.bool))
        k, v = torch.randn(B, Hk, 1, d, generator=g), torch.randn(B, Hk, 1, d, generator=g)
        cache.update(k, v, 0)
        if runner is not None:
            runner.layer_forward(cache, 0, torch.randn(B, H, 1, d, generator=g), d**-0.5)
        out.append((k, v))
    return out


def test_window_stays_full_precision_and_rolls_over_while_decoding():
    layout = layout_from_ids(IDS)
    n = len(IDS)
    R, G = 3, 4
    cache = run_policy(Full(vision_bits=2, text_bits=4, quant_residual=R, quant_group=G), layout, layers=1)
    layer = cache.layers[0]
    assert isinstance(layer, QuantizedLayer) and layer.window.slots == 0  # the prompt does not wait in the window
    assert [p.modality for p in layer.parts] == ["vision", "text"]
    appended = []
    for s in range(1, 16):
        appended += _decode(cache, 1)
        w = layer.window
        assert w.slots == (s if s <= R + G else R + 1 + (s - R - 1) % G)
        assert R + 1 <= w.slots <= R + G or s < R + 1
        recent = torch.cat([k for k, _ in appended[-w.slots :]], 2)
        assert torch.equal(w.keys, recent)  # the newest tokens, bit for bit
        assert torch.equal(w.positions[0, 0], torch.arange(n + s - w.slots, n + s))
        gen = [p for p in layer.parts if p.modality == "generated"]
        done = s - w.slots
        assert (gen[0].slots if gen else 0) == done and done % G == 0
        if gen:  # quantized one group of G at a time, within its scale of what was appended
            keys = torch.cat([k for k, _ in appended[:done]], 2)
            err = (dequantize(gen[0].keys) - keys).abs()
            assert bool((err <= _scale_per_entry(gen[0].keys) / 2 + 1e-6).all())
        assert torch.equal(layer.slot_positions()[0, 0], torch.arange(n + s))  # logical order: by position
    # the layer's own attention equals plain attention over its dequantized entries in logical order
    q = torch.randn(1, 4, 1, 8, generator=torch.Generator().manual_seed(3))
    k, v = layer.dense()
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(layer.attend(q, 8**-0.5), want, atol=1e-5, rtol=1e-5)


def test_evicting_quantized_slots_gathers_codes_and_keeps_scales():
    """Decode-time eviction (StreamingLLM at a token budget) on a quantized layer: the cache stays at its size, the
    survivors keep their dequantized values and a per-slot group index appears."""
    layout = layout_from_ids(IDS)
    policy = make_policy("streamingllm", budget=20, vision_bits=4, text_bits=4, quant_residual=1, quant_group=4)
    cache = run_policy(policy, layout, layers=1)
    layer = cache.layers[0]
    before = {int(p): kv for p, kv in zip(layer.slot_positions()[0, 0], layer.dense()[0][0, 0])}
    _decode(cache, 6, policy)
    pos = layer.slot_positions()[0, 0]
    assert layer.physical_length == 20 and len(set(pos.tolist())) == 20
    keys = layer.dense()[0][0, 0]
    for p, k in zip(pos.tolist(), keys):
        if p in before:
            assert torch.equal(k, before[p])
    assert any(isinstance(part.keys.index, torch.Tensor) for part in layer.parts if part.slots)


def test_bytes_counted_are_the_tensors_real_storage(tiny_model):
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    policy = SnapKV(vision_budget=0.5, vision_bits=4, text_bits=8, quant_residual=2, quant_group=4)
    with vlcache.compress(model, policy) as session:
        model.generate(**inputs, max_new_tokens=9, min_new_tokens=9, **GREEDY)
    with vlcache.compress(model, SnapKV(vision_budget=0.5)) as plain:
        model.generate(**inputs, max_new_tokens=9, min_new_tokens=9, **GREEDY)
    cache = session.last_cache
    total = 0
    for s in session.stats.layers:
        layer = cache.layers[s.layer]
        storage = sum(t.untyped_storage().nbytes() for t in layer.tensors())
        assert storage == s.nbytes == layer.kv_nbytes()
        total += storage
        for part in layer.parts:
            assert part.keys.codes.shape[-1] * 8 // part.keys.bits == layer.keys.shape[-1]
    assert session.stats.kv_bytes == total
    assert session.stats.kv_bytes_full == plain.stats.kv_bytes_full
    assert session.stats.kv_bytes < 0.6 * plain.stats.kv_bytes  # 4 / 8 bits instead of 32, plus scales
    assert session.stats.kv_bytes_by_kind["scales"] > 0 and session.stats.bits == {"vision": 4, "text": 8}


def test_8bit_keep_all_agrees_with_the_full_cache_on_held_out_questions():
    from vlcache.apps.evaluation.embedded_model import batch_inputs, load_embedded
    from vlcache.apps.evaluation.tasks import make_example

    model, processor = load_embedded()
    rng = np.random.default_rng(2 * 10**6 + 77)  # seeds no training batch drew
    # describe: "=" and one character per colour, each read from the cache after it was quantized
    inputs = batch_inputs(processor, [make_example("describe", 8, rng) for _ in range(24)])
    n = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        full = model.generate(**inputs, max_new_tokens=9, min_new_tokens=9, **GREEDY)[:, n:]
        with vlcache.compress(model, Full(vision_bits=8, text_bits=8)) as s:
            q8 = model.generate(**inputs, max_new_tokens=9, min_new_tokens=9, **GREEDY)[:, n:]
    assert s.stats.kv_ratio < 0.35  # fp32 -> 8-bit codes plus half-precision scales
    assert float((full == q8).float().mean()) >= 0.99


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_runs_with_quantization(tiny_model, family, name):
    """Selection, merging and decode-time eviction over a quantized cache: the same tokens held per layer as
    without quantization (the budgets hold), every layer quantized, fewer bytes."""
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    amount = {} if name == "full" else {"budget": 0.5}
    amount.update({"window": 4} if name == "cake" else {})
    quant = dict(vision_bits=4, text_bits=8, quant_residual=1, quant_group=4)  # a group is quantized by step 5
    runs = []
    for extra in ({}, quant):
        with vlcache.compress(model, make_policy(name, **amount, **extra)) as session:
            out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, **GREEDY)
        runs.append(session)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 6
    plain, quantized = (r.stats for r in runs)
    assert [round(s.total) for s in quantized.layers] == [round(s.total) for s in plain.layers]
    assert all(isinstance(runs[1].last_cache.layers[s.layer], QuantizedLayer) for s in quantized.layers)
    assert quantized.kv_bytes < 0.75 * plain.kv_bytes
    # the prompt is chosen (and merged) at full precision, then quantized: the same positions kept after prefill
    # (a quantized layer may add dead slots, at position -1, to fill its groups)
    a, b = ({li: [sorted(set(h) - {-1}) for h in p[0].tolist()] for li, p in r.prefill_positions.items()} for r in runs)
    assert a == b
    # after decoding too: a method that evicts nothing while decoding holds the same entries (the generated tokens
    # added, some of them quantized by now); one that evicts ranks over dequantized keys and may choose otherwise
    if not runs[0].policy.decodes:
        a, b = (
            {i: [sorted(set(h) - {-1}) for h in r.last_cache.layers[i].slot_positions()[0].tolist()] for i in a}
            for r in runs
        )
        assert a == b


def test_quantized_left_padded_batch_equals_each_prompt_alone(tiny_model):
    """Padding slots are dropped before quantizing and the shorter rows fill up with dead slots, all masked: a row
    gets the same tokens in a batch as alone."""
    model = tiny_model("qwen2_vl")
    rows = [["ab", testing.IMAGE, "what is it?"], ["xyzw vv", testing.IMAGE, "tell me more about it"]]
    policy = SnapKV(budget=0.5, window=4, vision_bits=4, text_bits=4, quant_residual=1, quant_group=4)
    with vlcache.compress(model, policy):
        batch = model.generate(**testing.make_inputs(model, rows).inputs, max_new_tokens=8, **GREEDY)
        for b, row in enumerate(rows):
            alone = model.generate(**testing.make_inputs(model, [row], seed=b).inputs, max_new_tokens=8, **GREEDY)
            assert batch[b, -8:].tolist() == alone[0, -8:].tolist()


def test_reference_attention_masks_what_is_not_visible():
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 2, 1, 8, generator=g),
        torch.randn(1, 1, 6, 8, generator=g),
        torch.randn(1, 1, 6, 8, generator=g),
    )
    from vlcache.quant import KVPart

    vis = torch.tensor([True, False, True, True, False, True])
    got = ref.quantized_attention(q, [KVPart(k, v, vis.view(1, 1, 1, 6))], 0.3)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k[:, :, vis].expand(1, 2, -1, 8), v[:, :, vis].expand(1, 2, -1, 8), scale=0.3
    )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "vlcache"])
def test_lookahead_waits_over_a_quantized_cache(tiny_model, name):
    """While a layer waits for the generated rows, its quantized groups are rebuilt each step, and every per-slot
    state follows its slots: the lookahead's waiting sums, one row per query head, were cut to the KV heads'
    count and raised. Now the cut comes, at the same budget as without quantization."""
    model = tiny_model("qwen2_vl")
    inputs = testing.make_inputs(model, prompt_for("qwen2_vl")).inputs
    runs = []
    for bits in ({}, dict(vision_bits=4, text_bits=8, quant_residual=1, quant_group=4)):
        with vlcache.compress(model, make_policy(name, budget=0.3, lookahead=2, **bits)) as s:
            model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, **GREEDY)
        runs.append(s.prefill_stats)
    plain, quantized = runs
    assert [round(s.total) for s in quantized.layers] == [round(s.total) for s in plain.layers]
    assert quantized.kv_bytes < 0.75 * plain.kv_bytes and plain.kv_ratio < 0.5  # tiny groups: scales weigh
