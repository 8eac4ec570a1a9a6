"""The peer benchmark's pieces that need no kvpress: recovering kept positions from keys, the text-tower loader, the
entropy probe and the matched budgets. (The benchmark itself runs end to end in CI, where kvpress is installed.)"""

import math

import pytest
import torch
import transformers as T

import vlcache
from vlcache.apps.bench import peer
from vlcache.apps.bench import positions as P
from vlcache.policies import SnapKV, StreamingLLM


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of x [..., n, d] by position (as Llama's rotary embedding does, half-split layout)."""
    d = x.shape[-1]
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    ang = pos.float()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def test_match_positions_finds_shuffled_kept_keys_and_flags_foreign_ones():
    g = torch.Generator().manual_seed(0)
    Hk, n, d = 2, 63, 16
    token = torch.randn(Hk, 5, d, generator=g)  # five distinct token vectors, repeated: only RoPE tells them apart
    pre = token[:, torch.arange(n) % 5]
    prompt = _rope(pre, torch.arange(n))
    want = torch.stack([torch.randperm(n, generator=g)[:20] for _ in range(Hk)])  # top-k order, not ascending
    kept = prompt.gather(1, want[..., None].expand(-1, -1, d))
    foreign = _rope(token[:, :3], torch.tensor([n, n + 1, n + 2]))  # generated tokens: positions past the prompt
    found = P.match_positions(torch.cat([kept, foreign], 1), prompt)
    assert torch.equal(found[:, :20], want)
    assert (found[:, 20:] == -1).all()
    noisy = P.match_positions(kept + 1e-7 * torch.randn(kept.shape, generator=g), prompt)
    assert torch.equal(noisy, want)  # float noise far below the tolerance still matches
    assert P.match_positions(kept[:, :0], prompt).shape == (Hk, 0)


def test_overlap_compare_and_cache_order():
    assert P.overlap([3, 1, 2, -1], [1, 2, 3]) == 1.0  # sets, generated entries (-1) left out
    assert P.overlap([1, 2], [2, 3]) == pytest.approx(1 / 3)
    a = [[[0, 1, 2], [4, 5, 6]], [[0, 1, 2], [4, 5, 6]]]
    b = [[[2, 1, 0], [4, 5, 7]], [[0, 1, 2], [6, 5, 4]]]
    assert P.compare(a, b) == [[1.0, 0.5], [1.0, 1.0]]
    assert P.ascending(a) == 1.0 and P.ascending(b) == 0.5
    assert P.prompt_counts([[[0, 1, -1]], [[5, -1, -1]]]) == [2, 1]
    assert P.duplicates([[[1, 1, 2]]]) == 1
    with pytest.raises(ValueError, match="layers"):
        P.compare(a, b[:1])
    before = [[[0, 1, 5, 6, 7, 8]]]
    assert P.evicts_oldest(before, [[[0, 1, 7, 8, -1, -1]]], keep_first=2) == 1.0  # a sliding window past 2 sinks
    assert P.evicts_oldest(before, [[[0, 1, 5, 8, -1, -1]]], keep_first=2) == 0.0  # 6 and 7 left, 5 stayed
    assert P.evicts_oldest(before, [[[1, 5, 6, 7, 8, -1]]], keep_first=2) == 0.0  # a sink left


def test_text_tower_state_renames_both_layouts_and_ties_a_missing_head():
    w = torch.ones(2)
    new = {"model.language_model.embed_tokens.weight": w, "lm_head.weight": 2 * w, "model.vision_tower.x": w}
    old = {"language_model.model.embed_tokens.weight": w, "language_model.lm_head.weight": 2 * w, "vision_tower.x": w}
    for state in (new, old):
        out = peer.text_tower_state(state)
        assert sorted(out) == ["lm_head.weight", "model.embed_tokens.weight"]
        assert out["model.embed_tokens.weight"] is w and torch.equal(out["lm_head.weight"], 2 * w)
    tied = peer.text_tower_state({"model.language_model.embed_tokens.weight": w})
    assert tied["lm_head.weight"] is w
    with pytest.raises(ValueError, match="language-model"):
        peer.text_tower_state({"vision_tower.x": w})


def test_embedded_text_tower_loads_as_a_plain_llama_and_qk_scale_scales_only_q_and_k():
    model, config, state = peer.build_model("embedded", 1.0)  # load_state_dict is strict: every weight found
    assert config["num_hidden_layers"] == len(model.model.layers)
    _, _, scaled = peer.build_model("embedded", 3.0)
    for name, t in state.items():
        factor = 3.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
        torch.testing.assert_close(scaled[name], factor * t)


def _tiny_llama(zero_q=False):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = T.LlamaForCausalLM(cfg).eval()
    if zero_q:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.zero_()
    return model


def test_entropy_probe_reads_one_for_uniform_attention():
    model = _tiny_llama(zero_q=True)  # every logit 0: attention is uniform over the keys a row sees
    probe = peer.EntropyProbe(rows=8)
    ids = torch.randint(4, 60, (1, 40), generator=torch.Generator().manual_seed(1))
    with vlcache.compress(model, probe) as session:
        peer.greedy(model, ids, session.new_cache(), 1, cache_kwarg=peer.CACHE_KWARG)
    assert sorted(probe.found) == [0, 1]
    for heads in probe.found.values():
        assert heads == pytest.approx([1.0] * 4, abs=1e-5)


@pytest.mark.parametrize("policy", [SnapKV(budget=0.3, window=4, protect=()), StreamingLLM(budget=0.3, protect=())])
def test_key_matching_agrees_with_vlcache_own_slot_positions(policy):
    """On vlcache's side both are known: positions recovered from keys equal the cache's own record, after prefill
    and after decoding (StreamingLLM evicts in place while decoding, so its slots leave sequence order)."""
    model = _tiny_llama()
    ids = torch.randint(4, 60, (1, 40), generator=torch.Generator().manual_seed(1))
    full, cache = peer.ours(model, ids, None, 6)
    prompt_keys = [layer.keys[:, :, :40] for layer in cache.layers]
    r, _ = peer.ours(model, ids, policy, 6, prompt_keys)
    assert r["own_record"]
    assert P.prompt_counts(r["at_prefill"]) == [12, 12]
    assert P.ascending(r["at_prefill"]) == 1.0  # vlcache compacts in sequence order
    assert P.duplicates(r["at_end"]) == 0


def test_matched_ratio_keeps_the_same_count_in_kvpress():
    """kvpress keeps int(n * (1 - ratio)); the ratio the benchmark passes makes that vlcache's floor(keep * n)."""
    for n in (100, 256, 1000, 4096):
        for keep in (0.1, 0.25, 0.5, 0.3):
            ratio = peer.runs(n, keep, 32, 5, 20.0, 4)[0].args["compression_ratio"]
            assert int(n * (1 - ratio)) == max(1, math.floor(keep * n))
