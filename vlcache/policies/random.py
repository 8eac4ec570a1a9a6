"""Random eviction: the floor every scoring method has to beat."""

from dataclasses import dataclass

import torch

from .base import Policy
from .view import LayerView


@dataclass(kw_only=True)
class Random(Policy):
    """Keeps a uniformly random subset within the budget (protected tokens still kept).

    A token's draw depends only on (seed, layer, KV head, its index among the row's real tokens), so a prompt
    gets the same choice alone or inside a padded batch.

    - seed (0): the same seed gives the same choice.
    - shared (False): one choice for all heads and layers instead of one per KV head and layer.
    """

    seed: int = 0
    shared: bool = False

    name = "random"

    def score(self, view: LayerView) -> torch.Tensor:
        B, Hk, T = view.slot_valid.shape
        heads = 1 if self.shared else Hk
        layer = 0 if self.shared else view.layer
        draws = torch.stack(
            [
                torch.rand(T, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + layer * 1009 + h))
                for h in range(heads)
            ]
        ).to(view.keys.device)  # [heads, T]
        pad = (~view.layout.valid).long().cumprod(-1).sum(-1)  # [B] leading padding
        real_index = (view.positions - pad.view(B, 1, 1)).clamp(min=0)  # [B, Hk, T]
        return draws[torch.arange(Hk, device=draws.device) % heads][None].expand(B, Hk, T).gather(-1, real_index)
