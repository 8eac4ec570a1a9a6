"""Every published method keeps what it kept when tests/golden/policies.pt was recorded (see
tests/golden/record_policies.py): the guard for rewriting the policies from parts."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))

from record_policies import AMOUNTS, EXTRA, cases, load, run  # noqa: E402

from vlcache.policies.presets import preset  # noqa: E402

AMOUNT_KEYS = {k for amount in AMOUNTS for k in amount}

RECORD = load()
CASES = cases()


def test_every_case_was_recorded():
    assert {label for label, _, _ in CASES} == set(RECORD)


def _key(record) -> tuple:
    return tuple(
        (phase, tuple(t.shape), tuple(t.flatten().tolist())) for phase in sorted(record) for t in record[phase]
    )


def test_every_setting_and_amount_changes_some_record():
    """The record tells each setting from the method's default (within the fast set's two amounts) and each amount
    from the others: a rewrite that ignored one would change a record, where two cases recorded alike would not."""
    by_case = {(name, tuple(sorted(s.items()))): _key(RECORD[label]) for label, name, s in CASES}
    for name, extras in EXTRA.items():
        amounts = [a for a in AMOUNTS if name != "elastic" or "budget" in a]
        for extra in extras:
            # the official rule keeps all text: protect=() is plain budget=0.3 there
            told = [a for a in amounts if not (extra.get("official_compat") and "protect" in a)]
            records = [by_case[name, tuple(sorted({**a, **extra}.items()))] for a in told]
            assert len(set(records)) == len(records), f"{name} {extra}: two amounts keep the same"
        for extra in extras[1:]:  # the fast set replays the first two amounts
            differs = [
                by_case[name, tuple(sorted({**a, **extra}.items()))]
                != by_case[name, tuple(sorted({**a, **extras[0]}.items()))]
                for a in amounts
            ]
            assert any(differs[:2]), f"{name} {extra}: the fast set's records are the default's"


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
