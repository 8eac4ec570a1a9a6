"""The command line, as a user runs it."""

import pathlib

import pytest

from vlcache.apps.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_compare_main_job_runs(capsys):
    assert main(["compare", "--frames", "2", "--max-new-tokens", "3", "--policies", "snapkv,h2o"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[3:]]
    assert [r[0] for r in rows] == ["full", "snapkv(budget=0.1)", "h2o(budget=0.1)"]
    # policy, kept/layer, text, vision, prompt KV, saved, ...
    kept, kv, saved = ([float(r[i].rstrip("%").replace(",", "")) for r in rows] for i in (1, 4, 5))
    assert saved[0] == 0.0  # the full cache saves nothing
    for i in (1, 2):  # each policy keeps a tenth of 46 tokens, or its protected text (10), and its saved column is
        # what its bytes say
        assert kept[i] < 0.5 * kept[0] and kv[i] < 0.5 * kv[0]
        assert saved[i] == round(100 * (1 - kv[i] / kv[0]), 1)


def test_user_mistakes_are_one_line(capsys):
    assert main(["compare", "--budget", "1.5", "--frames", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlcache: error: budget=1.5 is out of range") and err.count("\n") == 1
    assert main(["compare", "--policies", "nope", "--frames", "1"]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert main(["compare", "--policies", "h2o", "--set", "nope=1", "--frames", "1"]) == 2
    err = capsys.readouterr().err
    assert "h2o has no setting 'nope'" in err and "evict_every" in err and err.count("\n") == 1
    assert main(["compare", "--policies", "h2o", "--set", "evict_every", "--frames", "1"]) == 2
    assert "not a setting: 'evict_every'" in capsys.readouterr().err


def test_set_passes_policy_settings(capsys):
    args = ["compare", "--frames", "2", "--max-new-tokens", "3", "--policies", "h2o", "--set", "evict_every=4"]
    assert main([*args, "--set", "recent=0.25"]) == 0
    assert "h2o(budget=0.1, evict_every=4, recent=0.25)" in capsys.readouterr().out


def test_policies_lists_every_policy(capsys):
    from vlcache.policies import POLICIES

    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    for name in POLICIES:
        assert f"\n{name} " in "\n" + out
    assert "part_settings={}" in out  # a setting whose default is made by a factory is listed too


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command.strip() in (ROOT / "README.md").read_text()


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlcache: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_model_that_is_not_there_says_so(capsys, tmp_path):
    """A missing directory was reported as 'Repo id must use alphanumeric chars'."""
    base = ["compare", "--frames", "1", "--policies", "snapkv"]
    assert "/nonexistent: no such directory" in _one_line_error(capsys, [*base, "--model", "/nonexistent"])
    assert "no config.json" in _one_line_error(capsys, [*base, "--model", str(tmp_path)])
    err = _one_line_error(capsys, [*base, "--model", "someone/not-cached"])  # the tests run with HF_HUB_OFFLINE=1
    assert "not in the local Hugging Face cache, and HF_HUB_OFFLINE is set" in err


def test_a_text_only_model_is_refused_with_the_families(capsys, tmp_path):
    import transformers as T

    config = T.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, bos_token_id=0, eos_token_id=0)
    T.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    err = _one_line_error(capsys, ["compare", "--frames", "1", "--model", str(tmp_path / "gpt2")])
    assert "text-only gpt2 model" in err and "Supported vision-language families: llava" in err


@pytest.mark.slow
def test_an_unreachable_hub_fails_in_seconds(tmp_path):
    """It took 148 s of retries before the error when the hub cannot be reached."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="https://hub.invalid", HF_HOME=str(tmp_path / "hf"))  # .invalid never resolves
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "vlcache", "compare", "--frames", "1", "--model", "someone/some-model"],
        capture_output=True, text=True, env=env, timeout=45,
    )  # fmt: skip
    assert time.time() - started < 30
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "cannot reach the Hugging Face hub (hub.invalid)" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr


def test_a_setting_of_the_wrong_type_is_one_line(capsys):
    """--set recent=abc was a TypeError traceback."""
    base = ["compare", "--frames", "1", "--policies", "h2o"]
    err = _one_line_error(capsys, [*base, "--set", "recent=abc"])
    assert "--set recent='abc': recent takes a number (default 0.5)" in err
    assert "evict_every takes a whole number" in _one_line_error(capsys, [*base, "--set", "evict_every=2.5"])


def test_a_bare_name_that_is_neither_a_directory_nor_cached_says_both(capsys):
    err = _one_line_error(capsys, ["compare", "--frames", "1", "--model", "ckpt"])
    assert "--model ckpt (no directory of that name here either): not in the local Hugging Face cache" in err


def test_load_model_from_python_names_no_flag(tmp_path):
    """vlcache.load_model's errors named `--model`, a flag a Python caller never gave."""
    import vlcache

    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError) as e:
        vlcache.load_model(str(tmp_path / "ckpt"))
    assert str(e.value).startswith(f"model {tmp_path / 'ckpt'}: the directory has no config.json")


def test_policies_prints_whole_first_sentences(capsys):
    """The first docstring line was printed: "smoothed along the", "(one"."""
    from vlcache.apps.cli import first_sentence
    from vlcache.policies import POLICIES

    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    described = {}
    for line in out.splitlines():
        head, rest = line[:15].strip(), line[15:]
        if head:
            name = head
        if not rest.startswith(("paper: ", "settings: ")):
            described[name] = f"{described.get(name, '')} {rest}".strip()
    assert set(described) == set(POLICIES)
    for name, cls in POLICIES.items():
        text = described[name]
        assert text == first_sentence(cls.__doc__) and text.endswith("."), (name, text)
        assert text.count("(") == text.count(")"), (name, text)
    assert "smoothed along the sequence so that neighbours" in described["snapkv"]
    assert first_sentence("Keeps a (e.g. random) subset. Then more.") == "Keeps a (e.g. random) subset."
    assert first_sentence("Budget 0.5 of the\n    prompt.\n\n    - x") == "Budget 0.5 of the prompt."


def _compare_rows(out: str) -> dict[str, str]:
    """policy -> its output column, from `vlcache compare`'s table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    return {line.split()[0]: line.rsplit("  ", 1)[1].strip("'") for line in lines[start:] if line.strip()}


def test_compare_takes_a_video(capsys, tmp_path):
    """`vlcache compare VIDEO` was refused with "unrecognized arguments"."""
    from vlcache.apps.samples import ensure_samples

    video = ensure_samples(tmp_path, count=1)[0]
    assert main(["compare", str(video), "--policies", "vlcache", "--vision-budget", "0.25"]) == 0
    out = capsys.readouterr().out
    assert f"{video}, 8 frames, prompt of 154 tokens, 9 new tokens" in out.splitlines()[0]
    rows = _compare_rows(out)
    assert list(rows) == ["full", "vlcache(vision=0.25)"]
    assert main(["compare", str(video), "--frames", "4", "--policies", "snapkv"]) == 0
    assert "4 frames, prompt of 82 tokens, 9 new tokens" in capsys.readouterr().out


def test_compare_takes_images_and_reads_them(capsys, tmp_path):
    """The images given are the ones read: the full cache describes exactly their colours."""
    import numpy as np

    from vlcache.apps.evaluation.tasks import make_example

    ex = make_example("describe", 4, np.random.default_rng(3))
    paths = []
    for i, frame in enumerate(ex.frames):
        paths.append(str(tmp_path / f"frame{i}.png"))
        frame.save(paths[-1])
    assert main(["compare", *paths, "--policies", "vlcache"]) == 0
    out = capsys.readouterr().out
    assert "4 images, 4 frames" in out.splitlines()[0]
    assert _compare_rows(out)["full"] == "=" + ex.answer


@pytest.mark.parametrize(
    "args,message",
    [
        (["missing.mp4"], "file not found: missing.mp4"),
        (["README.md"], "README.md: not a video or image file name"),
        (["a.png", "b.mp4"], "give one video or several images, not b.mp4 among 2 files"),
        (["--frames", "0"], "--frames must be at least 1, got 0"),
        (["--question", " "], "--question is empty"),
    ],
)
def test_compare_bad_input_is_one_line(capsys, args, message):
    assert message in _one_line_error(capsys, ["compare", *args, "--policies", "snapkv"])
