"""Decode-time methods hold each modality at its own amount while decoding (policies/hold.py): a modality given
no amount loses nothing after the prefill, one given an amount stays at what the prefill kept of it, and neither
is evicted to make room for the other. A padded batch of two prompts, four layers, twelve decode steps."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))

from record_policies import IDS, MASK, cases  # noqa: E402
from util import IMG_ID, MARK_ID, layout_from_ids, real_positions, rows_alone_and_batched, run_policy  # noqa: E402

from vlcache.policies import make_policy  # noqa: E402

LAYERS, STEPS = 4, 12
METHODS = {
    "h2o": {},
    "h2o:recent": {"recent": 0.9},  # a window larger than the text hold: capped to it, or the hold is never met
    "streamingllm": {},
    "cake": {"window": 4},
    "cake:window": {"window": 24},
    "elastic": {"distance": 3},
    "h2o:every": {"evict_every": 3},
    "compose:h2o": {"scorer": "snapkv", "schedule": "h2o", "part_settings": {"window": 4}},
    "compose:streamingllm": {"scorer": "vlcache", "schedule": "streamingllm"},
    "compose:cake": {"scorer": "vlcache", "allocator": "preference", "schedule": "cake"},
    "compose:elastic": {"scorer": "h2o", "schedule": "elastic"},
}


def _policy(label, **amounts):
    return make_policy(label.split(":")[0], **METHODS[label], **amounts)


def _split(layout, cache, li):
    """Per row, (vision positions, text positions) that layer `li` holds (head 0; generated tokens are text)."""
    vision = layout.vision & layout.valid
    out = []
    for b, heads in enumerate(real_positions(cache, li)):
        is_vision = [p < layout.length and bool(vision[b, p]) for p in heads[0]]
        out.append(tuple([p for p, v in zip(heads[0], is_vision) if v == want] for want in (True, False)))
    return out


def _run(policy, layout, steps=STEPS):
    """(after the prefill, after `steps` decode steps, the recent window): per layer, per row, (vision, text)
    positions held; the window is the newest tokens per row the method keeps whatever the hold (0: none)."""
    after = {}

    def snapshot(cache):
        after.update({li: _split(layout, cache, li) for li in range(LAYERS)})

    cache = run_policy(policy, layout, layers=LAYERS, decode=steps, on_prefill=snapshot)
    windows = {}
    for li in range(LAYERS):
        state = cache.layers[li].state.get("policy")
        w = getattr(state, "recent", None)
        w = getattr(state, "window", None) if w is None else w
        windows[li] = [0] * layout.batch_size if w is None else w.tolist()
    return after, {li: _split(layout, cache, li) for li in range(LAYERS)}, windows


def _protected(layout, b, text_only=True):
    return int(((layout.marker | layout.question) & (layout.text if text_only else layout.valid))[b].sum())


@pytest.mark.parametrize("label", list(METHODS))
def test_a_vision_amount_alone_evicts_nothing_while_decoding(label):
    layout = layout_from_ids(IDS, MASK)
    after, end, _ = _run(_policy(label, vision_budget=0.2), layout)
    n = layout.length
    for li in range(LAYERS):
        for (vision, text), (vision_end, text_end) in zip(after[li], end[li]):
            assert vision_end == vision  # what the cut kept of the images, untouched
            assert text_end == text + list(range(n, n + STEPS))  # every text entry kept, the generated ones added


@pytest.mark.parametrize("label", list(METHODS))
def test_each_modality_stays_at_its_own_amount(label):
    layout = layout_from_ids(IDS, MASK)
    policy = _policy(label, vision_budget=0.2, text_budget=0.5)
    after, end, windows = _run(policy, layout)
    n = layout.length
    for li in range(LAYERS):
        for b, ((vision, text), (vision_end, text_end)) in enumerate(zip(after[li], end[li])):
            assert vision_end == vision  # no vision entry leaves for a generated token
            if label.endswith("elastic"):  # the kept fraction of the text seen: the prompt's and the generated
                seen = int(layout.text[b].sum())
                assert len(text_end) == int(len(text) / seen * (seen + STEPS))
            else:
                # held at what the prefill kept of the text, or at the protected tokens and the recent window
                # where those outgrow it (12 steps: every evict_every here has just evicted)
                newest = min(windows[li][b], STEPS)
                assert len(text_end) == max(len(text), _protected(layout, b) + newest)
                assert set(range(n + STEPS - newest, n + STEPS)) <= set(text_end)  # the window is all there


@pytest.mark.parametrize("label", ["h2o", "streamingllm", "cake", "elastic"])
def test_a_text_prompt_under_a_vision_amount_stays_whole(label):
    ids = torch.tensor([list(range(10, 49))])  # no image (9) or marker (8) token
    layout = layout_from_ids(ids)
    assert not (ids == IMG_ID).any()
    after, end, _ = _run(_policy(label, vision_budget=0.1), layout)
    for li in range(LAYERS):
        assert end[li][0] == ([], list(range(39 + STEPS)))


@pytest.mark.parametrize("label", ["h2o", "streamingllm", "cake", "elastic"])
def test_one_budget_still_holds_the_total(label):
    # the single `budget` is the papers' cache size: the layer's total is held, entries of any modality leaving
    layout = layout_from_ids(IDS, MASK)
    after, end, windows = _run(_policy(label, budget=0.3), layout)
    for li in range(LAYERS):
        for b, ((vision, text), (vision_end, text_end)) in enumerate(zip(after[li], end[li])):
            if label == "elastic":
                seen = int(layout.valid[b].sum())
                assert len(vision_end) + len(text_end) == int(0.3 * (seen + STEPS))
            else:  # (or at the protected tokens and the recent window, where those outgrow it)
                want = max(len(vision) + len(text), _protected(layout, b, False) + min(windows[li][b], STEPS))
                assert len(vision_end) + len(text_end) == want


@pytest.mark.parametrize("label", ["h2o", "streamingllm", "cake", "compose:h2o"])
@pytest.mark.parametrize(
    "amounts",
    [{"vision_budget": 0.05, "text_budget": 0.5, "frame_min": 2}, {"vision_budget": 0.2, "text_budget": 0.5}],
    ids=str,
)
def test_each_head_keeps_what_its_cut_left(label, amounts):
    """The hold counts what each KV head holds after the prefill: frame_min's forced tokens (beyond the plan's
    share) and Ada-KV's per-head split used to be cut back to the plan's per-row count at the first eviction,
    emptying frames and taking vision from the heads that kept more."""
    layout = layout_from_ids(IDS, MASK)
    extra = {"head_budgets": "adaptive"} if "frame_min" not in amounts else {}
    heads_after = {}

    def snapshot(cache):
        heads_after.update({li: real_positions(cache, li) for li in range(LAYERS)})

    cache = run_policy(_policy(label, **amounts, **extra), layout, layers=LAYERS, decode=STEPS, on_prefill=snapshot)
    vision = layout.vision & layout.valid
    for li in range(LAYERS):
        for b, heads in enumerate(real_positions(cache, li)):
            for h, pos in enumerate(heads):
                before = [p for p in heads_after[li][b][h] if vision[b, p]]
                assert [p for p in pos if p < layout.length and vision[b, p]] == before, (li, b, h)


# a short prompt with a long (protected) question beside a long one with a short question: the short row keeps more
# than the long one and its padding, so the long row fills up with slots it did not choose (filler)
SHORT = [1, MARK_ID] + [IMG_ID] * 8 + [MARK_ID] + list(range(10, 49))
LONG = [1, MARK_ID] + [IMG_ID] * 54 + [MARK_ID] + [10, 11, 12]


@pytest.mark.parametrize("label", list(METHODS))
@pytest.mark.parametrize(
    "amounts", [{"budget": 0.5}, {"vision_budget": 0.2}, {"vision_budget": 0.2, "text_budget": 0.5}], ids=str
)
def test_a_row_of_a_padded_batch_is_held_as_alone(label, amounts):
    """Elastic Cache took a row's filler slots for anchors and for kept tokens: the long row held 47 entries in the
    batch and 19 alone (per-modality amounts), or as many but others (budget)."""
    alone, batched = rows_alone_and_batched(lambda: _policy(label, **amounts), [SHORT, LONG], layers=LAYERS)
    assert batched == alone


GOLDEN_ROWS = [IDS[b][MASK[b].bool()].tolist() for b in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, settings",
    [(n, s) for _, n, s in cases() if n in ("h2o", "streamingllm", "cake", "elastic")],
    ids=[label for label, n, _ in cases() if n in ("h2o", "streamingllm", "cake", "elastic")],
)
def test_every_recorded_decode_case_holds_a_padded_row_as_alone(name, settings):
    """The golden batch's two prompts, every recorded setting of the decode-time methods: CAKE pooled its decode
    scores across a row's dead filler slots and shared one window over the batch (8 of these drifted)."""
    alone, batched = rows_alone_and_batched(lambda: make_policy(name, **settings), GOLDEN_ROWS, layers=4, decode=7)
    assert batched == alone


@pytest.mark.parametrize("label", ["h2o", "streamingllm", "compose:h2o", "elastic"])
@pytest.mark.parametrize("amounts", [{"budget": 90}, {"vision_budget": 0.2, "text_budget": 40}], ids=str)
def test_a_count_above_the_prompt_lets_the_cache_grow_up_to_it(label, amounts):
    # the golden rows have 70 and 76 tokens, 24 and 30 of them text: the cut keeps them (or their text) whole and
    # decoding adds to them until the count
    layout = layout_from_ids(IDS, MASK)
    steps = 30
    _, end, _ = _run(_policy(label, **amounts), layout, steps=steps)
    group = "text" if "text_budget" in amounts else "total"
    for li in range(LAYERS):
        for b, (vision, text) in enumerate(end[li]):
            prompt = int((layout.text if group == "text" else layout.valid)[b].sum())
            held = len(text) if group == "text" else len(vision) + len(text)
            assert held == min(prompt + steps, amounts.get("budget", amounts.get("text_budget")))


def test_a_layer_given_less_than_a_count_by_a_splitting_rule_stays_at_its_share():
    """A count below the prompt is the model's budget, which a pyramid splits over layers: each layer stays at its
    share while decoding (the count used to lift every layer back up to it, undoing the pyramid)."""
    layout = layout_from_ids(IDS, MASK)
    policy = make_policy("compose", budget=30, protect=(), scorer="h2o", allocator="pyramid", schedule="h2o")
    after, end, _ = _run(policy, layout)
    sizes = [[len(v) + len(t) for v, t in after[li]] for li in range(LAYERS)]
    assert len({tuple(s) for s in sizes}) > 1 and min(min(s) for s in sizes) < 30  # a pyramid, some layer below 30
    for li in range(LAYERS):
        assert [len(v) + len(t) for v, t in end[li]] == sizes[li]
