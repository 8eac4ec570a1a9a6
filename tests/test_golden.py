"""Every published method keeps what it kept when tests/golden/policies.pt was recorded (see
tests/golden/record_policies.py): the guard for rewriting the policies from parts."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))

from record_policies import AMOUNTS, cases, load, run  # noqa: E402

from vlcache.policies.presets import preset  # noqa: E402

AMOUNT_KEYS = {k for amount in AMOUNTS for k in amount}

RECORD = load()
CASES = cases()


def test_every_case_was_recorded():
    assert {label for label, _, _ in CASES} == set(RECORD)


def _param(case):
    """The fast set (`-m "not slow"`) replays each method's settings at the first two amounts, and the prefill
    cuts; the full suite replays every case."""
    label, name, settings = case
    amounts = {k: v for k, v in settings.items() if k in AMOUNT_KEYS}
    fast = "prune_at" in settings or amounts in AMOUNTS[:2]
    return pytest.param(*case, id=label, marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("label, name, settings", [_param(c) for c in CASES])
def test_policy_keeps_what_it_kept(label, name, settings):
    _same(RECORD[label], run(name, settings))


@pytest.mark.parametrize("label, name, settings", [_param(c) for c in CASES])
def test_every_published_method_is_its_preset_of_parts(label, name, settings):
    # the same record, the policy built from scorer, allocator, merger and schedule (policies/presets.py)
    _same(RECORD[label], run(name, settings, build=preset))


def _same(want, got):
    for phase in ("prefill", "decoded"):
        for li, (w, g) in enumerate(zip(want[phase], got[phase], strict=True)):
            assert w.shape == g.shape, f"{phase}, layer {li}: kept counts changed"
            assert torch.equal(w, g), f"{phase}, layer {li}: kept positions changed"
    assert ("merged_keys" in want) == ("merged_keys" in got)
    if "merged_keys" in want:
        for w, g in zip(want["merged_keys"], got["merged_keys"], strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
