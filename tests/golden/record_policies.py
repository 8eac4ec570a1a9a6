"""What every published method keeps, recorded once, so a rewrite of the policies can prove it changed nothing.

    python tests/golden/record_policies.py          # (re)writes tests/golden/policies.pt from the current code

For each policy and setting in CASES, on fixed hand-made tensors (a left-padded batch of two prompts with text,
marker tokens and three image spans; four layers), the kept positions of every layer after the prefill and after
seven decode steps, and the kept keys where a method merges. tests/test_golden.py replays the same cases and
compares. Only re-record on purpose: a changed golden file is a changed method.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/util.py
sys.path.insert(0, str(HERE.parents[1]))

from util import IMG_ID, MARK_ID, layout_from_ids, run_policy  # noqa: E402

from vlcache.policies import make_policy  # noqa: E402

GOLDEN = HERE / "policies.pt"
LAYERS, DECODE = 4, 7  # 7: an evict_every=3 cache is one token over its budget, an every-step one is not

_ROW = (
    [1, 5, 6, MARK_ID]
    + [IMG_ID] * 18
    + [MARK_ID, 7, MARK_ID]
    + [IMG_ID] * 18
    + [MARK_ID, 8, 9, MARK_ID]
    + [IMG_ID] * 12
    + [MARK_ID]
    + list(range(10, 24))
)
IDS = torch.tensor([[0] * 6 + _ROW[6:], _ROW])  # row 0 left-padded by 6 (it drops its first tokens' ids)
MASK = torch.tensor([[0] * 6 + [1] * (len(_ROW) - 6), [1] * len(_ROW)])

AMOUNTS = [
    {"budget": 0.3},
    {"budget": 30},  # above the longer row's 21 protected tokens (markers, question): scorers choose 9
    {"vision_budget": 0.2},
    {"vision_budget": 0.15, "text_budget": 0.5},
    {"budget": 0.4, "frame_min": 2},
    {"budget": 0.3, "protect": ()},
]
EXTRA = {
    "snapkv": [{"window": 4}, {"window": 4, "kernel": 1}, {"window": 4, "pooling": "max"}, {"window": 8, "agg": "max"}],
    "pyramidkv": [{"window": 4}, {"window": 4, "beta": 5}],
    "vlcache": [{}, {"exact": False}, {"max_queries": 4}, {"recent": 0.0, "threshold": 0.05}],
    "h2o": [{}, {"recent": 0.2}, {"normalize": True}, {"evict_every": 3}],
    "streamingllm": [{}, {"sinks": 2}, {"evict_every": 3}],
    "random": [{}, {"shared": True}, {"seed": 3}],
    "lookm": [{}, {"merge": "average"}, {"merge": "weighted"}, {"merge": "none"}, {"merge_filter": True}, {"official_compat": True}],
    "elastic": [{}, {"distance": 3}, {"start": 2, "evict_every": 2}],
    "cake": [{"window": 4}, {"window": 4, "cascading": False}, {"window": 4, "gamma": 5.0, "evict_every": 2}],
}  # fmt: skip
PRUNED = [("snapkv", {"window": 4, "vision_budget": 0.2, "prune_at": 1}), ("vlcache", {"budget": 0.3, "prune_at": 2})]


def cases():
    """(label, policy name, settings) of every recorded case."""
    out = []
    for name, extras in EXTRA.items():
        for extra in extras:
            for amount in AMOUNTS:
                settings = {**amount, **extra}
                out.append((f"{name}:{sorted(settings.items())}", name, settings))
    for name, settings in PRUNED:
        out.append((f"{name}:{sorted(settings.items())}", name, settings))
    return out


def _kept(cache) -> list[torch.Tensor]:
    """Per layer, the [B, Hk, K] kept positions sorted per head (in-place eviction leaves slots out of order;
    pyramid methods keep a different K per layer)."""
    return [cache.layers[i].slot_positions().sort(-1).values.to(torch.int16) for i in range(LAYERS)]


def run(name: str, settings: dict, build=make_policy) -> dict:
    """The kept positions of every layer after the prefill and after decoding, and the kept keys' sums where the
    method merges, for one case; `build(name, **settings)` makes the policy (the published class by default)."""
    seen = {}

    def after_prefill(cache):
        seen["prefill"] = _kept(cache)
        if name in ("lookm", "elastic"):
            seen["merged_keys"] = [cache.layers[i].keys.sum(-1) for i in range(LAYERS)]

    layout = layout_from_ids(IDS, MASK)
    cache = run_policy(build(name, **settings), layout, layers=LAYERS, seed=1, decode=DECODE, on_prefill=after_prefill)
    return {**seen, "decoded": _kept(cache)}


def pack(record: dict) -> dict:
    """One flat buffer per dtype and (offset, shape) entries: a few kilobytes instead of a zip entry per tensor."""
    flat = {torch.int16: [], torch.float32: []}
    index, sizes = {}, {torch.int16: 0, torch.float32: 0}
    for label, phases in record.items():
        index[label] = {}
        for phase, tensors in phases.items():
            entries = []
            for t in tensors:
                t = t.to(torch.float32) if t.is_floating_point() else t
                entries.append((sizes[t.dtype], tuple(t.shape)))
                flat[t.dtype].append(t.flatten())
                sizes[t.dtype] += t.numel()
            index[label][phase] = entries
    return {"index": index, "positions": torch.cat(flat[torch.int16]), "keys": torch.cat(flat[torch.float32])}


def load() -> dict:
    """The recorded cases, as `run` returns them."""
    if not GOLDEN.exists():
        return {}
    packed = torch.load(GOLDEN)
    out = {}
    for label, phases in packed["index"].items():
        out[label] = {}
        for phase, entries in phases.items():
            buf = packed["keys" if phase == "merged_keys" else "positions"]
            out[label][phase] = [buf[o : o + torch.Size(shape).numel()].view(shape) for o, shape in entries]
    return out


def main() -> int:
    torch.manual_seed(0)
    record = {label: run(name, settings) for label, name, settings in cases()}
    torch.save(pack(record), GOLDEN)
    print(f"recorded {len(record)} cases into {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
