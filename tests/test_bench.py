"""The benchmark scripts run end to end at a tiny size (their numbers are not asserted: timing belongs to the
benchmark runs, not to tests)."""

import json

import pytest

from vlcache.cli import main


def test_quality_quick(tmp_path):
    assert main(["bench", "quality", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quality.json").read_text())
    (row,) = data["accuracy"]
    assert row["task"] == "needle" and set(row["policies"]) == {"snapkv", "lookm"}
    assert {"agreement", "kl"} <= set(data["fidelity"]["snapkv"][0])
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_speed_quick(tmp_path):
    assert main(["bench", "speed", "--quick", "--sizes", "300", "--new-tokens", "3", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "speed.json").read_text())["rows"]
    assert [r["policy"] for r in rows] == ["plain", "full", "snapkv", "h2o"]
    snap = rows[2]
    assert snap["kv_ratio"] == pytest.approx(0.1, abs=0.02) and snap["peak_bytes"] > 0
    assert (tmp_path / "speed.png").exists()


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
    assert {r["op"] for r in rows} == {"stats-window", "stats-all", "assign", "merge", "gather"}
    assert all(r["impl"] == "reference" for r in rows)  # Triton needs a GPU


def test_reuse_quick(tmp_path):
    assert main(["bench", "reuse", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "reuse.json").read_text())["rows"]
    assert [r["images"] for r in rows] == [1, 2]
    for r in rows:
        assert r["reuse"]["full"]["agreement"] == 1.0  # recomputing everything is exact
        assert r["reuse"]["0"]["hits"] == r["images"]


def test_bench_usage():
    assert main(["bench"]) == 0
    assert main(["bench", "nope"]) == 2


def test_quant_speed_part(tmp_path):
    rows = "full,full:vision_bits=4;text_bits=4"
    args = ["bench", "quant", "--parts", "speed", "--preset", "quick", "--sizes", "300", "--new-tokens", "3"]
    assert main([*args, "--repeat", "1", "--speed-rows", rows, "--out", str(tmp_path)]) == 0
    out = {r["policy"]: r for r in json.loads((tmp_path / "quant.json").read_text())["speed"]}
    assert out["full:vision_bits=4;text_bits=4"]["kv_ratio"] < 0.25  # 4-bit codes + fp16 scales against fp32
    assert out["full:vision_bits=4;text_bits=4"]["decode_vs_16bit"] > 0 and out["full"]["kv_ratio"] == 1.0
    assert (tmp_path / "quant.png").stat().st_size > 0
