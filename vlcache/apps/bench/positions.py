"""Which prompt positions a compressed KV cache holds, recovered from its keys alone, and how two such sets compare.

A library need not say which tokens it kept, nor keep them in sequence order (kvpress leaves its cache in top-k
order). But post-RoPE keys are unique per position (the rotation differs at every position, even for one token
id), so each cached key is found among the full cache's prompt keys by nearest neighbour; a key that matches none
(a generated token's) gets -1. Depends on torch only, so the kvpress worker can load this file by path.
"""

import torch

TOLERANCE = 1e-4  # a match lies within this share of the prompt keys' mean norm (a copy is exactly 0 away)


def match_positions(kept: torch.Tensor, prompt: torch.Tensor, tol: float = TOLERANCE) -> torch.Tensor:
    """kept [Hk, K, d], prompt [Hk, n, d] -> [Hk, K] long: the prompt position of each kept key (slot order), -1
    where even the nearest prompt key is farther than `tol` times the prompt keys' mean norm. The nearest is found
    with fp32 distances (a copy is ~0 away, any other position far), then its distance is measured directly in
    fp64 (|a|^2 + |b|^2 - 2ab in fp32 would leave ~1e-4 of the norm even for an exact copy)."""
    if kept.shape[-2] == 0:
        return torch.zeros(kept.shape[:-1], dtype=torch.long)
    a, b = kept.float(), prompt.float()
    far = (b * b).sum(-1)[:, None, :] - 2 * a @ b.transpose(-1, -2)  # squared distance less |a|^2: [Hk, K, n]
    idx = far.argmin(-1)
    nearest = prompt.gather(1, idx[..., None].expand(-1, -1, prompt.shape[-1]))
    dist = (kept.double() - nearest.double()).norm(dim=-1)
    scale = prompt.double().norm(dim=-1).mean(-1, keepdim=True)  # [Hk, 1]
    return torch.where(dist <= tol * scale, idx, -1)


def cache_positions(cache, prompt_keys: list[torch.Tensor]) -> list[list[list[int]]]:
    """Per layer and KV head, the prompt positions a batch-1 cache holds in slot order (-1: not a prompt key).
    `prompt_keys[l]` [1, Hk, n, d]: the full cache's keys of layer l for the prompt."""
    out = []
    for layer, full in zip(cache.layers, prompt_keys):
        out.append(match_positions(layer.keys[0], full[0]).tolist())
    return out


def overlap(a: list[int], b: list[int]) -> float:
    """|A & B| / |A | B| of the prompt positions (-1 left out) two heads keep: 1 exactly when the sets are equal."""
    sa, sb = {p for p in a if p >= 0}, {p for p in b if p >= 0}
    union = sa | sb
    return len(sa & sb) / len(union) if union else 1.0


def compare(ours: list[list[list[int]]], theirs: list[list[list[int]]]) -> list[list[float]]:
    """Per layer and KV head, the overlap of the prompt positions two caches keep."""
    if len(ours) != len(theirs):
        raise ValueError(f"{len(ours)} layers against {len(theirs)}")
    return [[overlap(a, b) for a, b in zip(la, lb, strict=True)] for la, lb in zip(ours, theirs)]


def ascending(positions: list[list[list[int]]]) -> float:
    """Share of heads whose prompt entries (-1 left out) sit in the cache in increasing position order."""
    heads = [[p for p in h if p >= 0] for layer in positions for h in layer]
    return sum(all(x < y for x, y in zip(h, h[1:])) for h in heads) / max(1, len(heads))


def prompt_counts(positions: list[list[list[int]]]) -> list[int]:
    """Per layer, the prompt entries its first KV head holds (its budget, for methods that keep whole heads)."""
    return [sum(p >= 0 for p in layer[0]) for layer in positions]


def duplicates(positions: list[list[list[int]]]) -> int:
    """Prompt positions matched by more than one slot of a head (0 unless keys failed to be unique)."""
    return sum(len(q) - len(set(q)) for layer in positions for h in layer for q in [[p for p in h if p >= 0]])


def evicts_oldest(before: list[list[list[int]]], after: list[list[list[int]]], keep_first: int) -> float:
    """Share of heads whose prompt entries dropped between `before` and `after` are the oldest ones past the first
    `keep_first` positions (StreamingLLM's sinks), as a sliding window evicts; 1.0 where nothing was dropped."""
    ok = []
    for layer_b, layer_a in zip(before, after):
        for b, a in zip(layer_b, layer_a):
            held = sorted(p for p in b if p >= 0)
            dropped = set(held) - set(a)
            oldest = [p for p in held if p >= keep_first][: len(dropped)]
            ok.append(dropped == set(oldest))
    return sum(ok) / max(1, len(ok))
