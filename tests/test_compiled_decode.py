"""Compiled decode (`compile=True`): the frozen static-capacity cache, token identity with eager decoding, no host
synchronisation inside a step. torch.compile on CPU takes seconds per graph: the compiled tests share shapes (one
budget, one number of new tokens) so that dynamo reuses its graphs across policies; the cache tests run the frozen
steps uncompiled (`session.decode.capture = False`), which is the same cache without the compile time."""

import contextlib
from unittest import mock

import pytest
import torch
from util import prompt_for

import vlcache
from vlcache import testing
from vlcache.hf import CompressibleLayer, compiled_decode, model_parts, static_cache
from vlcache.hf import session as session_module
from vlcache.hf.compat import cache_kwargs
from vlcache.hf.static_cache import StaticLayer
from vlcache.policies import H2O, make_policy, preset

GREEDY = dict(do_sample=False)
NEW = 12
POLICIES = ["full", "random", "streamingllm", "h2o", "snapkv", "pyramidkv", "vlcache", "lookm", "elastic", "cake"]


@pytest.fixture(autouse=True)
def _no_silent_eager_fallback():
    """Past its recompile limit dynamo runs a function eagerly without a word, and token identity would still hold:
    here it raises instead, so a compiled test really ran compiled."""
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield


def _policy(name: str, **kw):
    return make_policy(name, **({} if name == "full" else {"budget": 0.5}), **kw)


def _run(model, inputs, policy, compile_, new=NEW, capture=True):
    with vlcache.compress(model, policy, compile=compile_) as s:
        if compile_:
            s.decode.capture = capture
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, **GREEDY)
    return out, s


@pytest.mark.parametrize("name", POLICIES + ["compose", "h2o-every-3", "cake-every-3", "streamingllm-every-5"])
def test_compiled_decode_is_token_identical_to_eager(tiny_model, name):
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    base, _, every = name.partition("-every-")
    kw = {"evict_every": int(every)} if every else {}
    eager, es = _run(model, inputs, _policy(base, **kw), False)
    compiled, cs = _run(model, inputs, _policy(base, **kw), True)
    assert cs.decode.steps == NEW - 1  # every step after the prompt went through the frozen cache
    assert torch.equal(compiled, eager)
    assert cs.stats.summary() == es.stats.summary()  # the same entries kept, per modality, at the end
    for i in es.last_cache.compressible():  # and the same slots: which ones a decode-time evictor dropped (CAKE
        # reads the step's attention mass from the frozen step, the eager run from its own pass)
        got, want = (r.last_cache.layers[i].slot_positions() for r in (cs, es))
        assert torch.equal(got.sort(-1).values, want.sort(-1).values), f"layer {i}: the kept slots differ"
    if base == "full":  # keep-all compiled is plain uncompressed generate
        assert torch.equal(compiled, model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY))


def _compiled_regions(model, inputs, policy):
    """Run compiled under the profiler: (tokens, session, {dynamo compiled region: times run}). Dynamo records one
    "Torch-Compiled Region: <frame>/<compile>" event per run of a compiled frame, a cached graph's runs included
    (a graph break splits a step into several frames: several regions)."""
    from collections import Counter

    # acc_events: torch 2.11 otherwise warns that it keeps only the last cycle (there is one cycle here)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], acc_events=True) as prof:
        out, s = _run(model, inputs, policy, True)
    regions = Counter(e.name for e in prof.events() if e.name.startswith("Torch-Compiled Region"))
    return out, s, regions


def test_compile_true_runs_every_frozen_step_through_a_compiled_graph(tiny_model):
    """compile=True really compiles: the session's step is a torch.compile'd function, not the eager forward, and
    every frozen step ran a dynamo-compiled graph (token identity with eager decoding alone would hold for a
    session that never compiled)."""
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    _, s, regions = _compiled_regions(model, inputs, _policy("snapkv"))
    assert s.decode.steps == NEW - 1
    assert s.decode._compiled is not None and s.decode.compiled(model.device) is s.decode._compiled
    assert s.decode._compiled is not s.decode._eager
    assert sum(regions.values()) == NEW - 1, f"frozen steps that ran compiled: {dict(regions)}"


@pytest.mark.parametrize("name", ["snapkv", "h2o"])
def test_a_compiled_step_is_one_graph_without_graph_breaks(tiny_model, name):
    """A frozen step compiles whole: no graph break (a host read such as `nonzero` or `.item()` in the static
    cache's update would break the graph, and the step would run as several graphs with eager Python between
    them), so every step runs the same single compiled region, for a prefill-only policy and a decode-time
    evictor (H2O, evicting between steps)."""
    from torch._dynamo.utils import counters

    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    breaks = sum(counters["graph_break"].values())
    _, s, regions = _compiled_regions(model, inputs, _policy(name))
    assert s.decode.steps == NEW - 1
    assert sum(counters["graph_break"].values()) == breaks, f"graph breaks: {dict(counters['graph_break'])}"
    assert list(regions.values()) == [NEW - 1], f"compiled regions run per step: {dict(regions)}"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3"])
@pytest.mark.parametrize("name", ["full", "snapkv", "h2o"])
def test_compiled_decode_on_mrope_and_sliding_window_models(tiny_model, family, name):
    """Qwen2-VL (M-RoPE positions) and Gemma 3 (sliding-window layers, frozen and masked by position: 63 prompt
    tokens and 12 new ones run past its window of 64)."""
    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    eager, _ = _run(model, inputs, _policy(name), False)
    compiled, s = _run(model, inputs, _policy(name), True)
    assert s.decode.steps == NEW - 1
    assert torch.equal(compiled, eager)
    if name == "full":
        assert torch.equal(compiled, model.generate(**inputs, max_new_tokens=NEW, min_new_tokens=NEW, **GREEDY))


def _padded(model):
    return testing.make_inputs(model, [prompt_for("llava"), ["x", testing.IMAGE, "what?"]]).inputs


def _snapshot(cache):
    """Per compressible layer: (keys, values, positions, visible) as the layer holds them, frozen or not."""
    out = {}
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, StaticLayer) and isinstance(layer.inner, CompressibleLayer):
            T = layer.filled
            out[i] = (layer.keys[:, :, :T], layer.values[:, :, :T], layer.pos[..., :T], layer.visible()[..., :T])
        elif isinstance(layer, CompressibleLayer):
            out[i] = (layer.keys, layer.values, layer.slot_positions(), cache.slot_valid(layer))
    return {i: tuple(t.clone() for t in ts) for i, ts in out.items()}


@pytest.mark.parametrize("name", ["snapkv", "h2o-every-4", "elastic"])
def test_static_cache_holds_what_the_dynamic_one_holds_after_40_steps(tiny_model, monkeypatch, name):
    """A left-padded batch of two, 40 decode steps: the frozen layers' entries, slot positions and masks equal
    the dynamic cache's, and the cache thawed at the end is the dynamic one."""
    model = tiny_model("llava")
    inputs = _padded(model)
    assert not bool(inputs["attention_mask"].all())
    base, _, every = name.partition("-every-")
    kw = {"evict_every": int(every)} if every else {}
    eager, es = _run(model, inputs, _policy(base, **kw), False, new=40)
    frozen = {}
    real_thaw = session_module.thaw
    monkeypatch.setattr(session_module, "thaw", lambda cache: (frozen.update(_snapshot(cache)), real_thaw(cache)))
    static, ss = _run(model, inputs, _policy(base, **kw), True, new=40, capture=False)
    assert ss.decode.steps == 39 and frozen
    assert torch.equal(static, eager)
    dynamic = _snapshot(es.last_cache)
    assert frozen.keys() == dynamic.keys()
    for i in dynamic:
        (k, v, pos, mask), (dk, dv, dpos, dmask) = frozen[i], dynamic[i]
        assert torch.equal(pos, dpos), f"layer {i}: slot positions differ"
        assert torch.equal(mask, dmask.expand_as(mask)), f"layer {i}: masks differ"
        # the new entries come from the same math over differently masked tensors: equal up to float rounding
        torch.testing.assert_close(k, dk, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, dv, atol=1e-5, rtol=1e-5)
    thawed = _snapshot(ss.last_cache)
    for i in dynamic:
        assert torch.equal(thawed[i][2], dynamic[i][2]) and torch.equal(thawed[i][3], dynamic[i][3])
        assert torch.equal(thawed[i][0], frozen[i][0])  # thawing moves nothing
    assert ss.stats.summary() == es.stats.summary()
    for i in dynamic:  # what a policy accumulates per slot (H2O's scores) too, the last steps' included
        for key, t in es.last_cache.layers[i].slot_state.items():
            torch.testing.assert_close(ss.last_cache.layers[i].slot_state[key], t, atol=1e-5, rtol=1e-5)


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def _no_host_sync():
    def sync(*args, **kwargs):
        raise HostSync("a host synchronisation inside a decode step")

    with contextlib.ExitStack() as stack:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            stack.enter_context(mock.patch.object(torch.Tensor, name, sync))
        yield


def _guard_steps(model, session, skip_evictions=True):
    """Raise on any host sync inside the model forward of every step that starts on a frozen cache (the first
    decode step freezes it, eagerly); evictions between steps are left out when asked."""
    stack = contextlib.ExitStack()

    def before(module, args, kwargs):
        cache = session.cache
        if cache is not None and cache.static is not None:
            stack.enter_context(_no_host_sync())

    def after(module, args, kwargs, output):
        stack.close()

    if skip_evictions and session.decode is not None:
        evict = session.decode.evict

        def unguarded(cache):
            stack.pop_all().close()  # the policy's eviction between steps is eager and may synchronise
            try:
                evict(cache)
            finally:
                stack.enter_context(_no_host_sync())

        session.decode.evict = unguarded
    # registered after the session's own hooks: the guard starts after its pre-hook saw the step
    return [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]


@pytest.mark.parametrize("name", ["snapkv", "h2o"])
def test_a_frozen_decode_step_never_synchronises_with_the_host(tiny_model, name):
    model = tiny_model("llava")
    inputs = _padded(model)
    with vlcache.compress(model, _policy(name), compile=True) as s:
        s.decode.capture = False  # uncompiled, so every Python-level sync would run (and raise)
        handles = _guard_steps(model, s)
        try:
            model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, **GREEDY)
        finally:
            for h in handles:
                h.remove()
    assert s.decode.steps == 5


def test_the_guard_catches_the_dynamic_caches_host_syncs(tiny_model):
    """The same guard on the dynamic cache's decode steps raises (H2O evicts inside the step there, reading
    counts back to the host): it does see a sync where there is one."""
    model = tiny_model("llava")
    inputs = _padded(model)
    with vlcache.compress(model, _policy("h2o")) as s:
        stack = contextlib.ExitStack()

        def before(module, args, kwargs):
            if s.cache is not None and s.cache.prefilled:
                stack.enter_context(_no_host_sync())

        handles = [
            model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(lambda *a, **k: stack.close(), with_kwargs=True),
        ]
        try:
            with pytest.raises(HostSync):
                model.generate(**inputs, max_new_tokens=3, **GREEDY)
        finally:
            stack.close()
            for h in handles:
                h.remove()


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("make", [H2O, lambda **kw: preset("h2o", **kw)], ids=["h2o", "preset"])
def test_a_policy_reading_the_decode_mass_keeps_what_its_second_pass_keeps(tiny_model, every, make):
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    eager, es = _run(model, inputs, H2O(budget=0.5, evict_every=every), False)
    compiled, cs = _run(model, inputs, make(budget=0.5, evict_every=every), True)
    assert cs.decode.mass and cs.decode.every == every  # a preset's schedule gives both, as the class does
    assert torch.equal(compiled, eager)
    for i in cs.last_cache.compressible():
        assert torch.equal(cs.last_cache.layers[i].slot_positions(), es.last_cache.layers[i].slot_positions())
        a, b = cs.last_cache.layers[i].slot_state["h2o"], es.last_cache.layers[i].slot_state["h2o"]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_one_compiled_step_serves_every_prompt_length(tiny_model, monkeypatch):
    """Capacities follow the prompt; they are dynamic dims, so prompts of other lengths and budgets reuse the
    graph: no compile after the first, and the tokens stay the eager ones."""
    from torch._dynamo.utils import counters

    model = tiny_model("llava")
    capacities, graphs = [], []
    real_thaw = session_module.thaw

    def thaw(cache):
        if cache.static is not None:
            capacities.append(cache.layers[0].capacity)
        real_thaw(cache)

    monkeypatch.setattr(session_module, "thaw", thaw)
    for words, budget in (("", 0.5), (" x" * 60, 0.5), (" x" * 60, 0.9)):
        inputs = testing.make_inputs(model, prompt_for("llava", "what is it?" + words)).inputs
        eager, _ = _run(model, inputs, make_policy("snapkv", budget=budget), False)
        compiled, s = _run(model, inputs, make_policy("snapkv", budget=budget), True)
        assert s.decode.steps == NEW - 1 and torch.equal(compiled, eager)
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(set(capacities)) == 3, f"the prompts should need three capacities, got {capacities}"
    assert graphs[1] == graphs[0] and graphs[2] == graphs[0], f"recompiled for a new capacity: {graphs}"


@pytest.mark.parametrize("name", ["full", "snapkv", "h2o"])
def test_the_cuda_attention_path_on_cpu(tiny_model, monkeypatch, name):
    """On CUDA every frozen layer attends through the decode kernel (the stock SDPA path would leave a long cache
    to a few SMs); here the same path runs on the CPU through the kernel's reference, compiled: the custom op
    with and without the mass, its fake shapes under dynamic capacities, the output's layout. Tokens as eager."""
    from vlcache.hf import static_cache
    from vlcache.kernels import compiled_ops

    monkeypatch.setattr(static_cache.kernels, "backend", lambda device: "triton")
    calls = []
    real = compiled_ops._impl

    def counted(*args):  # inside the custom op: dynamo never sees it, so counting adds no guard
        calls.append(torch.compiler.is_compiling())
        return real(*args)

    monkeypatch.setattr(compiled_ops, "_impl", counted)
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    eager, _ = _run(model, inputs, _policy(name), False)
    compiled, s = _run(model, inputs, _policy(name), True)
    # the op ran at every compiled step of both layers, as one opaque call (never while dynamo traced)
    assert len(calls) == 2 * (NEW - 1) and not any(calls) and s.decode.steps == NEW - 1
    assert torch.equal(compiled, eager)


def test_compile_refuses_what_it_cannot_freeze(tiny_model):
    model = tiny_model("llava")
    with pytest.raises(ValueError, match="quantized"):
        vlcache.attach(model, "snapkv", budget=0.5, vision_bits=4, compile=True)
    with pytest.raises(ValueError, match="lookahead"):
        vlcache.attach(model, "h2o", budget=0.5, lookahead=2, compile=True)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (scripts/gpu_check.sh runs it)")


@CUDA
@pytest.mark.parametrize("name", ["snapkv", "h2o"])
def test_replayed_cuda_graph_steps_never_synchronise(name, monkeypatch):
    """On a GPU: past the first steps (dynamo's compile, CUDA graph warm-up and recording), every compiled step
    replays with `torch.cuda.set_sync_debug_mode("error")` on, which raises at any synchronising call; those steps
    neither record nor run eagerly (CUDA graph trees' own entry points, counted: an explicit synchronize while
    recording would not trip the debug mode), none was skipped (inductor counts each skip), and the tokens are those
    of the same frozen cache run uncompiled."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    model = testing.build("llava").to("cuda")
    model.set_attn_implementation("sdpa")
    inputs = {k: v.to("cuda") for k, v in _padded(model).items()}
    # the same static cache and kernels run uncompiled: what the graphs replay must give exactly its tokens (eager
    # decoding attends with SDPA, not the decode kernel, so a near tie may differ there: the CPU tests compare those)
    with vlcache.compress(model, _policy(name), compile=True) as s:
        s.decode.capture = False
        frozen = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, **GREEDY)
    skips = counters["inductor"]["cudagraph_skips"]
    guarded, inside, slow = [], [], []
    manager = cudagraph_trees.CUDAGraphTreeManager
    for entry in ("record_function", "run_eager"):  # what a step that does not replay goes through
        real = getattr(manager, entry)

        def counted(self, *args, real=real, entry=entry, **kwargs):
            if inside:
                slow.append(entry)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(manager, entry, counted)
    with vlcache.compress(model, _policy(name), compile=True) as s:
        compiled_for = s.decode.compiled

        def compiled(device):
            step = compiled_for(device)

            def run(**kwargs):
                if s.decode.steps < 3:
                    return step(**kwargs)
                torch.cuda.set_sync_debug_mode("error")
                inside.append(True)
                try:
                    return step(**kwargs)
                finally:
                    inside.clear()
                    torch.cuda.set_sync_debug_mode(0)
                    guarded.append(s.decode.steps)

            return run

        s.decode.compiled = compiled
        out = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, **GREEDY)
    assert len(guarded) == 12  # steps 4..15 under the guard
    assert not slow, f"guarded steps did not replay: {slow}"
    assert counters["inductor"]["cudagraph_skips"] == skips, "CUDA graphs were skipped (TORCH_LOGS=perf_hints says why)"
    assert torch.equal(out, frozen)


@pytest.mark.parametrize("name", ["h2o", "streamingllm", "cake", "elastic"])
def test_a_decode_time_evictor_with_prune_at_decodes_as_eagerly(tiny_model, name):
    """The layers after `prune_at` are left to themselves while decoding: compiled decode kept their query rows
    anyway and never reset their counter, which ran off the end of its buffer at the second eviction."""
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    kw = {"prune_at": 0, "window": 4} if name == "cake" else {"prune_at": 0}
    eager, _ = _run(model, inputs, _policy(name, **kw), False)
    frozen, s = _run(model, inputs, _policy(name, **kw), True, capture=False)
    assert torch.equal(frozen, eager) and s.decode.steps == NEW - 1


def _chat(model, inputs, policy, compile_, follow: int):
    """Two turns on one cache: 10 tokens, then `follow` more prompt tokens and 12 generated."""
    with vlcache.compress(model, policy, compile=compile_) as s:
        if compile_:
            s.decode.capture = False
        cache = s.new_cache()
        first = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=10, min_new_tokens=10, **GREEDY)
        ids = torch.cat([first, torch.arange(5, 5 + follow)[None]], 1)  # token ids only: the image is cached
        second = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            cache=cache,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            **GREEDY,
        )
    return second, s


@pytest.mark.parametrize("name", ["h2o", "streamingllm", "cake", "elastic"])
def test_a_chats_next_turn_evicts_when_eager_decoding_would(tiny_model, name):
    """The policy's count of tokens since its last eviction carries over from the first turn (and its short next
    prompt adds to it); compiled decode restarted its own count at each freeze: H2O and CAKE then evicted at the
    wrong steps without a word, StreamingLLM and Elastic Cache raised."""
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    kw = {"evict_every": 4, **({"window": 4} if name == "cake" else {})}
    for follow in (1, 2):  # 10 + 1 and 10 + 2 tokens: 3 and 0 past the last eviction
        eager, es = _chat(model, inputs, _policy(name, **kw), False, follow)
        frozen, s = _chat(model, inputs, _policy(name, **kw), True, follow)
        assert torch.equal(frozen, eager), follow
        _same_slots(s, es)
        assert s.decode.steps == 9 + NEW - 1  # both turns' steps went through the frozen cache


def _same_slots(a, b):
    """The two sessions' last caches hold the same positions in every compressible layer."""
    for i in b.last_cache.compressible():
        got, want = (r.last_cache.layers[i].slot_positions() for r in (a, b))
        assert torch.equal(got.sort(-1).values, want.sort(-1).values), i


@pytest.mark.parametrize("name", ["h2o", "streamingllm"])
def test_a_cache_that_grows_mid_generate_keeps_the_eviction_count(tiny_model, monkeypatch, name):
    """Told too little room, the frozen cache is rebuilt mid-generate (after a flush of the pending steps): the
    steps after it evict where eager decoding does, not `evict_every` steps after the rebuild."""
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    # room for 2 tokens at the exact capacity: full 2 steps after each rebuild, 1 short of an eviction
    monkeypatch.setattr(session_module, "new_tokens", lambda *a: 2)
    monkeypatch.setattr(static_cache, "ROUND", 1)
    rebuilds = []
    monkeypatch.setattr(compiled_decode, "thaw", lambda cache: (rebuilds.append(1), static_cache.thaw(cache)))
    eager, es = _run(model, inputs, _policy(name, evict_every=3), False, new=30)
    frozen, s = _run(model, inputs, _policy(name, evict_every=3), True, new=30, capture=False)
    assert rebuilds  # the cache was rebuilt mid-generate, one step short of an eviction
    assert torch.equal(frozen, eager)
    _same_slots(s, es)


def test_generate_without_a_length_leaves_room_for_its_20_tokens(tiny_model):
    """generate told neither max_new_tokens nor max_length adds 20 tokens to the prompt: the frozen cache was
    sized for one (20 minus the prompt's length), and rebuilt mid-generate."""
    assert model_parts.new_tokens({}, testing.build("llava").generation_config, torch.zeros(1, 244)) == 20
    assert model_parts.new_tokens({"max_length": 250}, None, torch.zeros(1, 244)) == 6
    assert model_parts.new_tokens({"max_new_tokens": 3, "max_length": 250}, None, torch.zeros(1, 244)) == 3


@pytest.mark.parametrize("bad", ["yes", "no", 1, None])
def test_compile_takes_true_or_false_only(tiny_model, bad):
    with pytest.raises(ValueError, match="compile must be True or False"):
        vlcache.attach(tiny_model("llava"), "snapkv", budget=0.5, compile=bad)


@pytest.mark.parametrize("name", ["h2o", "streamingllm", "cake", "elastic", "compose"])
@pytest.mark.parametrize("amounts", [{"vision_budget": 0.3}, {"vision_budget": 0.3, "text_budget": 0.5}], ids=str)
def test_per_modality_holds_decode_as_eagerly_and_a_vision_hold_never_stops_the_graph(
    tiny_model, monkeypatch, name, amounts
):
    """A hold of the vision alone can never be exceeded (decoding adds only text): the frozen steps run on without
    stopping for the policy; with a text hold too they stop, and evict what eager decoding evicts."""
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, prompt_for("llava")).inputs
    kw = {"window": 4} if name == "cake" else {"schedule": "h2o"} if name == "compose" else {}
    eager, es = _run(model, inputs, make_policy(name, **amounts, **kw), False)
    stops = []
    evict = compiled_decode.CompiledDecode.evict
    monkeypatch.setattr(compiled_decode.CompiledDecode, "evict", lambda self, c: stops.append(1) or evict(self, c))
    frozen, s = _run(model, inputs, make_policy(name, **amounts, **kw), True, capture=False)
    assert torch.equal(frozen, eager) and s.decode.steps == NEW - 1
    _same_slots(s, es)
    assert (len(stops) > 0) == ("text_budget" in amounts)
