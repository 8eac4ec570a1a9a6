"""The benchmarks' command lines: --quick fills in only the flags not given (bench quant, reuse and decode overwrote
explicit ones with the quick grid), and a bad value is one argparse line naming the flag, the value and what is
accepted, exit status 2, before any model is built (bench peer turned --tokens 0 and --new-tokens 0 into its
defaults). Nothing here runs a benchmark: the functions that build a model are replaced by ones that fail."""

import sys

import pytest

from vlcache.apps.bench import decode, peer, quant, reuse, speed
from vlcache.apps.cli import main


class Built(Exception):
    """Raised where a model would be built: what was parsed is recorded by then."""


def _never(*args, **kwargs):
    raise AssertionError("a model was built before the flags were checked")


@pytest.fixture
def no_models(monkeypatch):
    """Every function of these benchmarks that builds or loads a model fails the test if it is called."""
    for module, name in (
        (quant, "run_speed"),
        (quant, "run_peer"),
        (quant, "run_quality"),
        (reuse, "build"),
        (reuse, "trained_accuracy"),
        (decode, "bench_model"),
        (peer, "build_model"),
    ):
        monkeypatch.setattr(module, name, _never)


# ----------------------------------------------------------------------------- explicit flags win over --quick


def test_quant_quick_fills_only_the_flags_not_given():
    given = quant.parse_args(
        ["--quick", "--preset", "cpu", "--sizes", "300,600", "--new-tokens", "3", "--peer-tokens", "64", "--n", "2",
         "--repeat", "2", "--tasks", "count,static", "--quality-rows", "vlcache:vision_bits=2;text_bits=2"]
    )  # fmt: skip
    assert (given.preset, given.sizes, given.new_tokens, given.peer_tokens, given.n, given.repeat) == (
        "cpu", [300, 600], 3, 64, 2, 2,
    )  # fmt: skip
    assert given.tasks == ["count", "static"]
    assert given.quality_rows == given.fidelity_rows == ["vlcache:vision_bits=2;text_bits=2"]
    quick = quant.parse_args(["--quick"])
    assert (quick.preset, quick.sizes, quick.new_tokens, quick.peer_tokens, quick.n, quick.repeat) == (
        "quick", [512], 4, 256, 4, 1,
    )  # fmt: skip
    assert quick.tasks == ["needle"] and len(quick.quality_rows) == 2
    mixed = quant.parse_args(["--quick", "--n", "7"])  # one flag given: the rest are still the quick ones
    assert (mixed.n, mixed.preset, mixed.repeat, mixed.tasks) == (7, "quick", 1, ["needle"])
    default = quant.parse_args([])
    assert (default.preset, default.sizes, default.new_tokens, default.peer_tokens, default.n, default.repeat) == (
        "cpu", [4096], 32, 4096, 100, 5,
    )  # fmt: skip
    assert len(default.tasks) == 6 and len(default.quality_rows) == len(quant.QUALITY_ROWS)


def test_quant_runs_its_parts_with_the_explicit_flags(monkeypatch):
    """Through the command line: the speed part is handed the flags given, not the quick grid."""
    seen = []

    def run_speed(args):
        seen.append(args)
        raise Built

    monkeypatch.setattr(quant, "run_speed", run_speed)
    with pytest.raises(Built):
        main(["bench", "quant", "--quick", "--parts", "speed", "--preset", "cpu", "--sizes", "300", "--repeat", "2",
              "--new-tokens", "3"])  # fmt: skip
    (args,) = seen
    assert (args.preset, args.sizes, args.repeat, args.new_tokens, args.parts) == ("cpu", [300], 2, 3, ["speed"])


def test_reuse_quick_fills_only_the_flags_not_given():
    given = reuse.parse_args(
        ["--quick", "--images", "3,1", "--ks", "2,full", "--new-tokens", "5", "--reps", "2", "--trained-n", "7"]
    )
    assert (given.images, given.ks, given.new_tokens, given.reps, given.trained_n) == ([3, 1], ["2", "full"], 5, 2, 7)
    quick = reuse.parse_args(["--quick"])
    assert (quick.images, quick.ks, quick.new_tokens, quick.reps, quick.trained_n) == ([1, 2], ["0", "full"], 4, 1, 2)
    assert reuse.parse_args(["--quick", "--trained-n", "0"]).trained_n == 0  # 0: skip the embedded-model part
    default = reuse.parse_args([])
    assert (default.images, default.ks, default.new_tokens, default.reps, default.trained_n) == (
        [1, 2, 4, 8, 16], ["0", "4", "16", "full"], 32, 3, 60,
    )  # fmt: skip


def test_reuse_runs_with_the_explicit_flags(monkeypatch):
    """Through the command line, on the quick model (--quick still picks it): the first timed prompt holds the
    --images given and is timed --reps times (the quick grid's 1 image and 1 rep ran instead)."""
    built, timed = [], []
    real_build = reuse.build

    def build(size, device):
        built.append(size)
        return real_build(size, device)

    def ttft(model, inputs, reps):
        timed.append((len(inputs["pixel_values"]), reps))
        raise Built

    monkeypatch.setattr(reuse, "build", build)
    monkeypatch.setattr(reuse, "ttft", ttft)
    with pytest.raises(Built):
        main(["bench", "reuse", "--quick", "--images", "2", "--reps", "2", "--ks", "1"])
    assert built == [reuse.SIZES["quick"]] and timed == [(2, 2)]


def test_decode_quick_keeps_an_explicit_preset(monkeypatch):
    """--quick is the quick preset (and its sizes) unless --preset says otherwise (it overrode --preset)."""
    built = []

    def build(preset, max_tokens):
        built.append((preset, max_tokens))
        raise Built

    monkeypatch.setattr(speed, "build_model", build)  # what decode's bench_model builds with
    for argv, preset, size in (
        (["--quick"], "quick", 300),
        (["--quick", "--preset", "cpu"], "cpu", 1024),
        (["--quick", "--preset", "cpu", "--sizes", "500"], "cpu", 500),
        ([], "cpu", 1024),
    ):
        with pytest.raises(Built):
            main(["bench", "decode", *argv])
        assert built.pop() == (decode.PRESETS[preset], size)
    args = decode.parse_args(["--quick", "--preset", "cpu", "--policies", "h2o"])
    assert (args.preset, args.policies, args.sizes) == ("cpu", ["full", "h2o"], [1024])
    assert decode.parse_args(["--quick"]).policies == ["full", "snapkv", "h2o"]


def test_peer_quick_fills_only_the_flags_not_given():
    given = peer.parse_args(["--quick", "--tokens", "100", "--new-tokens", "7"])
    assert (given.tokens, given.new_tokens) == (100, 7)
    quick = peer.parse_args(["--quick"])
    assert (quick.tokens, quick.new_tokens, quick.qk_scale) == (256, 4, 3.0)
    default = peer.parse_args(["--model", "embedded"])
    assert (default.tokens, default.new_tokens, default.qk_scale) == (4096, 32, 1.0)


# ----------------------------------------------------------------------------- bad values: one line, exit status 2

MISTAKES = {
    "quant": [
        (["--quick", "--n", "0"], "--n must be at least 1, got 0"),
        (["--quick", "--new-tokens", "0"], "--new-tokens must be at least 1, got 0"),
        (["--quick", "--repeat", "0"], "--repeat must be at least 1, got 0"),
        (["--quick", "--peer-tokens", "-1"], "--peer-tokens must be at least 1, got -1"),
        (["--quick", "--sizes", "abc"], "--sizes takes comma-separated token counts, got 'abc'"),
        (["--quick", "--sizes", "0"], "--sizes takes positive token counts, got '0'"),
        (["--quick", "--tasks", "nosuch"], "--tasks: no task 'nosuch'; choose from needle, where, lookup,"),
        (["--quick", "--tasks", ","], "--tasks is empty: give at least one, comma-separated"),
        (["--quick", "--parts", "speed,nope"], "--parts: no part 'nope'; choose from speed, peer, quality"),
        (["--quick", "--quality-rows", "nosuch"], "--quality-rows 'nosuch': unknown policy 'nosuch'; choose one of"),
        (["--quick", "--speed-rows", "vlcache:vision_bits=3"],
         "--speed-rows 'vlcache:vision_bits=3': vision_bits must be one of 16, 8, 4, 2"),
        (["--quick", "--fidelity-rows", "full:text_bits=5"], "--fidelity-rows 'full:text_bits=5': text_bits must be"),
        (["--quick", "--vision-budget", "2"], "--vision-budget: vision_budget=2.0 is out of range"),
        (["--quick", "--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
        (["--quick", "--device", "nope"], "--device takes a torch device (cpu, cuda, cuda:1), got 'nope'"),
    ],
    "reuse": [
        (["--quick", "--images", "0"], "--images takes comma-separated image counts of at least 1, got '0'"),
        (["--quick", "--images", "1,x"], "--images takes comma-separated image counts of at least 1, got '1,x'"),
        (["--quick", "--images", ""], "--images takes comma-separated image counts of at least 1, got ''"),
        (["--quick", "--ks", "-1"], "--ks takes comma-separated token counts of at least 0 or 'full', got '-1'"),
        (["--quick", "--ks", "0,all"], "--ks takes comma-separated token counts of at least 0 or 'full', got '0,all'"),
        (["--quick", "--new-tokens", "0"], "--new-tokens must be at least 1, got 0"),
        (["--quick", "--reps", "0"], "--reps must be at least 1, got 0"),
        (["--quick", "--trained-n", "-1"], "--trained-n must be at least 0 (0: skip), got -1"),
        (["--quick", "--device", "gpu"], "--device takes a torch device (cpu, cuda, cuda:1), got 'gpu'"),
    ],
    "decode": [
        (["--quick", "--batch", "0"], "--batch must be at least 1, got 0"),
        (["--quick", "--new-tokens", "1"], "--new-tokens must be at least 2 (decode steps follow the first token), got 1"),
        (["--quick", "--sizes", ""], "--sizes takes positive token counts, got ''"),  # was the preset's sizes
        (["--quick", "--eager-sizes", "400"],
         "--eager-sizes and --peer-sizes must be among --sizes: --eager-sizes 400, --sizes 300"),
        (["--quick", "--budget", "0"], "--budget: budget=0.0 is out of range"),
        (["--quick", "--policies", "nosuch"], "--policies 'nosuch': unknown policy 'nosuch'; choose one of"),
    ],
    "peer": [
        (["--tokens", "0"], "--tokens must be at least 1, got 0"),  # was the default, 4096
        (["--quick", "--new-tokens", "0"], "--new-tokens must be at least 1, got 0"),  # was the quick 4
        (["--quick", "--tokens", "-5"], "--tokens must be at least 1, got -5"),
        (["--quick", "--tokens", "32"], "--tokens must exceed --window 32 (kvpress's SnapKV asserts it), got 32"),
        (["--quick", "--window", "0"], "--window must be at least 1, got 0"),
        (["--quick", "--repeat", "0"], "--repeat must be at least 1, got 0"),
        (["--quick", "--threads", "0"], "--threads must be at least 1, got 0"),
        (["--quick", "--kernel", "4"], "--kernel takes a positive odd number, got 4"),
        (["--quick", "--keep", "0"], "--keep takes a share of the prompt in (0, 1], got 0.0"),
        (["--quick", "--keep", "1.5"], "--keep takes a share of the prompt in (0, 1], got 1.5"),
        (["--quick", "--beta", "0.5"], "--beta must be at least 1, got 0.5"),
        (["--quick", "--qk-scale", "inf"], "--qk-scale takes a finite number, got inf"),
    ],
}  # fmt: skip
CASES = [(bench, argv, message) for bench, cases in MISTAKES.items() for argv, message in cases]


@pytest.mark.parametrize("bench, argv, message", CASES, ids=[f"{bench} {' '.join(argv)}" for bench, argv, _ in CASES])
def test_bad_flags_are_one_line_before_any_model(bench, argv, message, no_models, capsys):
    if bench == "peer":  # an interpreter that exists: the flags are checked before kvpress is looked for anyway
        argv = [*argv, "--kvpress-python", sys.executable]
    with pytest.raises(SystemExit) as e:
        main(["bench", bench, *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"vlcache bench {bench}: error: {message}"), err
    assert sum("error:" in line for line in err) == 1 and not any("Traceback" in line for line in err), err


def test_peer_checks_its_flags_before_looking_for_kvpress(capsys):
    """A bad flag is said even where kvpress is not installed (it was a FileNotFoundError, or the default)."""
    with pytest.raises(SystemExit) as e:
        peer.main(["--tokens", "0", "--kvpress-python", "/nonexistent/python"])
    assert e.value.code == 2 and "--tokens must be at least 1, got 0" in capsys.readouterr().err
