"""The benchmark scripts run end to end at a tiny size (their numbers are not asserted: timing belongs to the
benchmark runs, not to tests)."""

import json
from pathlib import Path

import pytest
import torch

from vlcache.apps.cli import main


@pytest.mark.slow
def test_quality_quick(tmp_path):
    assert main(["bench", "quality", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quality.json").read_text())
    (row,) = data["accuracy"]
    assert row["task"] == "needle" and set(row["policies"]) == {"snapkv", "lookm"}
    assert {"agreement", "kl"} <= set(data["fidelity"]["snapkv"][0])
    assert (tmp_path / "quality.png").stat().st_size > 0


@pytest.mark.slow
def test_speed_quick(tmp_path):
    assert main(["bench", "speed", "--quick", "--sizes", "300", "--new-tokens", "3", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["plain", "full", "snapkv", "h2o"]
    snap = rows[2]
    assert snap["kv_ratio"] == pytest.approx(0.1, abs=0.02) and snap["peak_bytes"] > 0
    assert (tmp_path / "speed.png").exists()


@pytest.mark.slow
def test_speed_rows_for_the_prefill_settings(tmp_path):
    """Static frames: temporal merging removes every repeated frame; prune_at keeps the budget; e2e is reported."""
    args = ["bench", "speed", "--quick", "--sizes", "600", "--new-tokens", "2", "--scene", "static"]
    args += [
        "--vision-budget",
        "0.25",
        "--policies",
        "snapkv:prune_at=0,full:temporal_merge=0.9",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    data = json.loads((tmp_path / "speed.json").read_text())
    rows = {r["policy"]: r for r in data["rows"]}
    assert data["setup"]["vision_budget"] == 0.25 and data["setup"]["scene"] == "static"
    from vlcache.apps.bench.speed import GRID

    per_image = GRID * GRID // 4
    images = rows["full"]["n"] // per_image  # plus a few text tokens per image and the question
    assert rows["full:temporal_merge=0.9"]["merged"] == (images - 1) * per_image  # every frame but the first
    assert rows["full"]["merged"] == 0
    assert rows["snapkv:prune_at=0"]["kv_ratio"] < 0.5
    assert all(r["total_s"] > 0 and "total_vs_plain" in r for r in rows.values())


@pytest.mark.slow
def test_kernels_on_cpu(tmp_path):
    args = [
        "bench",
        "kernels",
        "--device",
        "cpu",
        "--sizes",
        "128",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--dim",
        "16",
        "--reps",
        "1",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {
        "stats-window",
        "stats-all",
        "assign",
        "merge",
        "gather",
        "decode",
        "decode-mass",
    }
    assert {r["impl"] for r in rows if r["op"] != "decode"} == {"reference"}  # Triton needs a GPU
    assert {r["impl"] for r in rows if r["op"] == "decode"} == {"reference", "sdpa", "sdpa-repeat"}  # SDPA: decode only
    assert main(args[:-2] + ["--ops", "decode", "--out", str(tmp_path)]) == 0
    assert {r["op"] for r in json.loads((tmp_path / "kernels.json").read_text())["rows"]} == {"decode"}
    with pytest.raises(SystemExit):
        main(args + ["--ops", "decoder"])


@pytest.mark.slow
def test_reuse_quick(tmp_path):
    assert main(["bench", "reuse", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "reuse.json").read_text())["rows"]
    assert [r["images"] for r in rows] == [1, 2]
    for r in rows:
        assert r["reuse"]["full"]["agreement"] == 1.0  # recomputing everything is exact
        assert r["reuse"]["0"]["hits"] == r["images"]


QUALITY_MISTAKES = [
    (["--n", "0"], "--n must be at least 1, got 0"),  # was a ZeroDivisionError traceback
    (
        ["--tasks", "nosuch"],
        "--tasks: no task 'nosuch'; choose from needle, where, lookup, count, describe, static",
    ),
    (["--frames", "0"], "--frames takes comma-separated frame counts of at least 1, got '0'"),  # was "high <= 0"
    (["--budgets", "abc"], "--budgets takes comma-separated shares of the vision tokens in (0, 1], got 'abc'"),
    (["--budgets", "0.1,2"], "--budgets takes comma-separated shares of the vision tokens in (0, 1], got '0.1,2'"),
    (["--policies", "nosuch"], "--policies 'nosuch': unknown policy 'nosuch'; choose one of full,"),
    (["--tasks", "where", "--frames", "16"], "nothing to run: --tasks where answer with one digit"),
    # --quick supplies only what is not given: these were ignored, and the quick grid ran
    (["--quick", "--policies", "nosuch"], "--policies 'nosuch': unknown policy 'nosuch'"),
    (["--quick", "--budgets", "abc"], "--budgets takes comma-separated shares of the vision tokens"),
    (["--quick", "--tasks", "nosuch"], "--tasks: no task 'nosuch'; choose from needle,"),
]


@pytest.mark.parametrize("argv, message", QUALITY_MISTAKES, ids=[" ".join(a) for a, _ in QUALITY_MISTAKES])
def test_quality_refuses_bad_flags_before_loading(argv, message, capsys, monkeypatch):
    from vlcache.apps.bench import quality

    def load(*a):
        raise AssertionError("the model loaded before the flags were checked")

    monkeypatch.setattr(quality, "load_embedded", load)
    with pytest.raises(SystemExit) as e:
        main(["bench", "quality", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"vlcache bench quality: error: {message}"), err


def test_quality_quick_fills_only_the_flags_not_given():
    from vlcache.apps.bench.quality import parse_args

    quick = parse_args(["--quick"])
    assert (quick.policies, quick.tasks, quick.budgets, quick.frames, quick.n) == (
        ["snapkv", "lookm"], ["needle"], [0.1, 1.0], [8], 4,
    )  # fmt: skip
    mixed = parse_args(["--quick", "--tasks", "static,count", "--n", "2", "--policies", "h2o:evict_every=4"])
    assert (mixed.policies, mixed.tasks, mixed.budgets, mixed.frames, mixed.n) == (
        ["h2o:evict_every=4"], ["static", "count"], [0.1, 1.0], [8], 2,
    )  # fmt: skip
    assert parse_args([]).n == 100 and parse_args([]).frames == [8, 16] and len(parse_args([]).tasks) == 6


SPEED_MISTAKES = [
    (["--sizes", "abc", "--quick"], "--sizes takes comma-separated token counts, got 'abc'"),  # was int()'s
    (["--sizes", "0", "--quick"], "--sizes takes positive token counts, got '0'"),
    (["--sizes", "", "--quick"], "--sizes takes positive token counts, got ''"),  # was the preset's sizes
    (["--quick", "--policies", "nosuch"], "--policies 'nosuch': unknown policy 'nosuch'; choose one of full,"),
    (["--quick", "--budget", "5"], "--budget: budget=5.0 is out of range"),
    (["--quick", "--new-tokens", "0"], "--new-tokens must be at least 1, got 0"),
]


@pytest.mark.parametrize("argv, message", SPEED_MISTAKES, ids=[" ".join(a) for a, _ in SPEED_MISTAKES])
def test_speed_refuses_bad_flags_before_building(argv, message, capsys, monkeypatch):
    from vlcache.apps.bench import speed

    def build(*a):
        raise AssertionError("the model was built before the flags were checked")

    monkeypatch.setattr(speed, "build_model", build)
    with pytest.raises(SystemExit) as e:
        main(["bench", "speed", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"vlcache bench speed: error: {message}"), err


def test_speed_quick_keeps_an_explicit_preset(monkeypatch):
    """--quick is the quick preset unless --preset says otherwise (it overrode --preset)."""
    from vlcache.apps.bench import speed

    built = []

    class Built(Exception):
        pass

    def build(preset, max_tokens):
        built.append((preset, max_tokens))
        raise Built

    monkeypatch.setattr(speed, "build_model", build)
    for argv, preset in ((["--quick"], "quick"), (["--quick", "--preset", "cpu"], "cpu"), ([], "cpu")):
        with pytest.raises(Built):
            speed.main([*argv, "--sizes", "300"])
        assert built.pop() == (speed.PRESETS[preset], 300)


KERNELS_MISTAKES = [
    (["--sizes", ""], "--sizes takes positive token counts, got ''"),  # was the default sizes
    (["--sizes", "4k"], "--sizes takes comma-separated token counts, got '4k'"),  # was int()'s traceback
    (["--reps", "0"], "--reps must be at least 1, got 0"),  # was a statistics.median of nothing
]


@pytest.mark.parametrize("argv, message", KERNELS_MISTAKES, ids=[" ".join(a) for a, _ in KERNELS_MISTAKES])
def test_kernels_refuses_bad_flags_before_timing(argv, message, capsys, monkeypatch):
    from vlcache.apps.bench import kernels

    def bandwidth(*a):
        raise AssertionError("timing started before the flags were checked")

    monkeypatch.setattr(kernels, "copy_bandwidth", bandwidth)
    with pytest.raises(SystemExit) as e:
        main(["bench", "kernels", "--device", "cpu", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"vlcache bench kernels: error: {message}"), err


def test_quant_json_names_the_presets_device(tmp_path, monkeypatch):
    """The speed part runs on its preset's device when --device is not given: quant.json said CPU for a cuda preset.
    The GPU's name is asked of torch, so a machine without one can check which label is chosen."""
    from vlcache.apps.bench import quant

    asked = []
    monkeypatch.setattr(quant.torch.cuda, "get_device_name", lambda d=None: asked.append(d) or "Some GPU")
    monkeypatch.setattr(quant, "run_speed", lambda args: [])
    monkeypatch.setattr(quant, "plot", lambda *a: None)
    quant.main(["--parts", "speed", "--preset", "qwen2vl-7b", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "quant.json").read_text())["device"] == "Some GPU" and asked == ["cuda"]
    quant.main(["--parts", "speed", "--preset", "qwen2vl-7b", "--device", "cpu", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "quant.json").read_text())["device"].startswith("CPU")
    quant.main(["--parts", "speed", "--preset", "cpu", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "quant.json").read_text())["device"].startswith("CPU") and asked == ["cuda"]


def test_bench_usage():
    assert main(["bench"]) == 0
    assert main(["bench", "nope"]) == 2


@pytest.mark.slow  # a benchmark quick-run (5 s); the full suite runs it
def test_quant_speed_part(tmp_path):
    rows = "full,full:vision_bits=4;text_bits=4"
    args = ["bench", "quant", "--parts", "speed", "--preset", "quick", "--sizes", "300", "--new-tokens", "3"]
    assert main([*args, "--repeat", "1", "--speed-rows", rows, "--out", str(tmp_path)]) == 0
    out = {r["policy"]: r for r in json.loads((tmp_path / "quant.json").read_text())["speed"]}
    assert out["full:vision_bits=4;text_bits=4"]["kv_ratio"] < 0.25  # 4-bit codes + fp16 scales against fp32
    assert out["full:vision_bits=4;text_bits=4"]["decode_vs_16bit"] > 0 and out["full"]["kv_ratio"] == 1.0
    assert (tmp_path / "quant.png").stat().st_size > 0


@pytest.mark.slow  # two compiled graphs (about 15 s); the full suite runs it
def test_decode_quick(tmp_path):
    """Two sizes, eager rows at the first only (the GPU script's shape at 128K: compiled rows alone)."""
    argv = ["bench", "decode", "--quick", "--new-tokens", "3", "--sizes", "300,600", "--eager-sizes", "300"]
    assert main(argv + ["--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    first, second = sorted({r["n"] for r in rows})
    assert {(r["policy"], r["mode"]) for r in rows if r["n"] == first} == {
        (p, m) for p in ("full", "snapkv", "h2o") for m in ("eager", "compiled")
    }
    assert {(r["policy"], r["mode"]) for r in rows if r["n"] == second} == {
        (p, "compiled") for p in ("full", "snapkv", "h2o")
    }
    # the compiled rows ran compiled (every step after the first token through the compiled step), so that
    # same_tokens compares two different paths
    assert all(r["compiled_steps"] == 2 for r in rows if r["mode"] == "compiled")
    assert all("compiled_steps" not in r for r in rows if r["mode"] == "eager")
    assert all(r["same_tokens"] for r in rows if r["n"] == first)  # compiled decoding gives the eager tokens
    assert all(r["same_tokens"] is None and r["speedup"] is None for r in rows if r["n"] == second)
    assert all(r["vs_full"] == 1.0 for r in rows if r["policy"] == "full")
    assert (tmp_path / "decode.png").exists()


@pytest.mark.slow  # compiles the quick model's step (about 10 s)
def test_decode_keeps_going_past_a_row_that_fails(tmp_path, monkeypatch):
    """A row that fails while running (out of memory, a compile error) is kept as its one-line error and the rows
    after it still run; a bad policy is refused before anything runs."""
    from vlcache.apps import timed_run

    real = timed_run.run

    def run(model, processor, inputs, policy, *args, compile=False, **kw):
        if compile and policy is not None and policy.name == "snapkv":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(model, processor, inputs, policy, *args, compile=compile, **kw)

    monkeypatch.setattr(timed_run, "run", run)
    argv = ["bench", "decode", "--quick", "--new-tokens", "5", "--policies", "snapkv,h2o", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    failed = [r for r in rows if "error" in r]
    assert [(r["policy"], r["mode"]) for r in failed] == [("snapkv", "compiled")]
    assert failed[0]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert {(r["policy"], r["mode"]) for r in rows if "error" not in r} == {
        ("full", "eager"),
        ("full", "compiled"),
        ("snapkv", "eager"),
        ("h2o", "eager"),
        ("h2o", "compiled"),
    }
    with pytest.raises(SystemExit):
        main(["bench", "decode", "--quick", "--policies", "snapkv:no_such_setting=1"])


def test_decode_refuses_sizes_it_does_not_run(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "decode", "--quick", "--sizes", "300", "--eager-sizes", "400"])
    assert "--eager-sizes and --peer-sizes must be among --sizes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "decode", "--quick", "--sizes", "3x0"])
    assert "--sizes takes comma-separated token counts" in capsys.readouterr().err


def test_decode_targets_reads_the_gpu_runs(tmp_path):
    """scripts/decode_targets.py (the GPU script's last step): each of issue 19's targets met or missed from the
    rows, an out-of-memory full cache at batch 8 counted as the batch that does not fit, and nothing claimed for
    what was not measured."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "decode_targets", Path(__file__).parents[1] / "scripts" / "decode_targets.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert all(line.startswith("not measured") for line in mod.targets([tmp_path]))
    (tmp_path / "decode").mkdir()
    (tmp_path / "decode_batch8").mkdir()
    row = dict(n=131072, mode="compiled", bound_ms=5.5, cuda_graphs=True, compiled_steps=35)
    rows = [dict(row, policy=p, decode_ms=ms, bandwidth_fraction=5.5 / ms) for p, ms in
            (("full", 10.0), ("snapkv", 7.0), ("h2o:evict_every=16", 8.0), ("cake:evict_every=16", 9.0))]  # fmt: skip
    rows[-1].update(cuda_graphs=False, graph_steps=dict(replayed=30, slow=2, steps=32))
    rows[2].update(compiled_steps=0)  # a "compiled" row that decoded eagerly
    (tmp_path / "decode" / "decode.json").write_text(json.dumps({"rows": rows}))
    eight = [dict(n=32768, policy="full", mode="compiled", error="OutOfMemoryError: CUDA out of memory"),
             dict(n=32768, policy="snapkv", mode="compiled", decode_ms=9.0, peak_bytes=2**35)]  # fmt: skip
    (tmp_path / "decode_batch8" / "decode.json").write_text(json.dumps({"rows": eight}))
    second = tmp_path / "second_call"  # the GPU script's second call returns its own folder
    (second / "decode_8k").mkdir(parents=True)
    small = [
        dict(n=8192, mode="compiled", policy="snapkv", decode_ms=3.0, hf_static_ms=6.0, speedup=2.5, same_tokens=True)
    ]
    (second / "decode_8k" / "decode.json").write_text(json.dumps({"rows": small}))
    lines = mod.targets([tmp_path, second])
    assert (
        "peer at 8192 tokens: plain Hugging Face, static cache, compiled: 6.00 ms/token; SnapKV compiled 0.50x of it"
        in lines
    )
    assert "compiled against eager at 8192 tokens: snapkv 2.50x" in lines
    assert lines[0].startswith("met: SnapKV compiled at 131072 tokens reaches 0.79 of the bound")
    assert lines[1].startswith("met: SnapKV's compiled step 0.70x")
    assert lines[2].startswith("met: h2o:evict_every=16 compiled 1.14x") and lines[3].startswith("MISSED: cake")
    assert (
        "CUDA graphs: not replayed in cake:evict_every=16@131072 (30 of 32 steady steps replayed, 2 recorded or eager)"
        in lines
    )
    assert "compiled step: NOT run by h2o:evict_every=16@131072" in lines
    assert lines[-1].startswith("met: batch 8: the full cache failed (OutOfMemoryError")
    # both fit: the verdict compares what each run needs, not the absolute peak, which counts an earlier row's cache
    # still held while SnapKV ran
    eight = [dict(n=32768, policy="full", mode="compiled", decode_ms=20.0, peak_bytes=50 * 2**30,
                  run_peak_bytes=50 * 2**30),
             dict(n=32768, policy="snapkv", mode="compiled", decode_ms=9.0, peak_bytes=60 * 2**30,
                  run_peak_bytes=20 * 2**30)]  # fmt: skip
    (tmp_path / "decode_batch8" / "decode.json").write_text(json.dumps({"rows": eight}))
    assert mod.targets([tmp_path])[-1].startswith("met: batch 8 at 32768 tokens: SnapKV peaks at 20.0 GiB, the full")
    # the device sends the JSON without plots (8 files at most): --plots draws each run's here, once per run
    drawn = mod.plots([tmp_path, second], tmp_path / "plots")
    assert sorted(p.name for p in drawn) == ["decode.png", "decode_8k.png", "decode_batch8.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in drawn)


def test_the_kernel_benchmarks_sdpa_rows_compute_decode_attention():
    """The SDPA comparators of `bench kernels` (transformers' two ways of a masked decode step) give the reference's
    output: the rows time the same attention."""
    from vlcache.apps.bench.kernels import Sdpa, SdpaRepeat
    from vlcache.kernels import reference as ref

    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 6, 1, 16, generator=gen),
        torch.randn(2, 2, 50, 16, generator=gen),
        torch.randn(2, 2, 50, 8, generator=gen),
    )
    valid = torch.rand(2, 2, 50, generator=gen) > 0.3
    want, _ = ref.decode_attention(q, k, v, valid, 0.25)
    for impl in (Sdpa, SdpaRepeat):
        torch.testing.assert_close(
            impl.decode_attention(q, k, v, valid, 0.25, None, False)[0], want, atol=1e-5, rtol=1e-5
        )


def test_graph_calls_counts_replays_per_steady_step(monkeypatch):
    """bench decode's "graphs" column: a steady step counts as replayed only through CUDA graph trees' replay entry
    point, and one that records or runs eagerly is counted against it (inductor's own skip counter grows once per
    compiled function, so a row reusing an earlier row's graph could never show a skip). The entry points are faked
    here (no GPU); the model's forwards are real."""
    from torch._inductor import cudagraph_trees

    from vlcache.apps.bench.graph_calls import GraphCalls, all_replayed

    manager = cudagraph_trees.CUDAGraphTreeManager
    for entry in ("execute_node", "record_function", "run_eager"):
        monkeypatch.setattr(manager, entry, lambda self, *a, _e=entry, **k: _e)
    model = torch.nn.Linear(2, 2)
    plan = ["record_function", "run_eager", "record_function", "execute_node", "execute_node", "execute_node"]
    with GraphCalls(model) as calls:
        model(torch.zeros(1, 2))  # the prompt: no graph
        for entry in plan:  # decode steps 1..6: the first three record, then replays
            model(torch.zeros(1, 2))
            assert getattr(manager, entry)(None) == entry  # the real entry point still runs
    assert calls.steady(3, 6) == dict(replayed=3, slow=0, steps=3) and all_replayed(calls.steady(3, 6))
    assert calls.steady(2, 6) == dict(replayed=3, slow=1, steps=4) and all_replayed(calls.steady(2, 6)) is False
    assert manager.execute_node(None) == "execute_node" and len(calls.calls) == len(plan)  # removed
    with GraphCalls(model) as none:  # steps that went through no entry point: graphs skipped
        for _ in range(5):
            model(torch.zeros(1, 2))
    assert none.steady(1, 4) == dict(replayed=0, slow=0, steps=3) and all_replayed(none.steady(1, 4)) is False
