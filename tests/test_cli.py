"""The command line, as a user runs it."""

import pathlib

from vlcache.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_compare_main_job_runs(capsys):
    assert main(["compare", "--frames", "2", "--max-new-tokens", "3", "--policies", "snapkv,h2o"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[3:]]
    assert rows == ["full", "snapkv(budget=0.1)", "h2o(budget=0.1)"]
    assert "0.0%" in out.splitlines()[3]  # the full cache saves nothing


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


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command.strip() in (ROOT / "README.md").read_text()
