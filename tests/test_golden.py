"""Every published method keeps what it kept when tests/golden/policies.pt was recorded (see
tests/golden/record_policies.py): the guard for rewriting the policies from parts."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))

from record_policies import cases, load, run  # noqa: E402

RECORD = load()
CASES = cases()


def test_every_case_was_recorded():
    assert {label for label, _, _ in CASES} == set(RECORD)


@pytest.mark.parametrize("label, name, settings", CASES, ids=[c[0] for c in CASES])
def test_policy_keeps_what_it_kept(label, name, settings):
    want, got = RECORD[label], run(name, settings)
    for phase in ("prefill", "decoded"):
        for li, (w, g) in enumerate(zip(want[phase], got[phase], strict=True)):
            assert w.shape == g.shape, f"{phase}, layer {li}: kept counts changed"
            assert torch.equal(w, g), f"{phase}, layer {li}: kept positions changed"
    assert ("merged_keys" in want) == ("merged_keys" in got)
    if "merged_keys" in want:
        for w, g in zip(want["merged_keys"], got["merged_keys"], strict=True):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
