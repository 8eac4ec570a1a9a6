"""Full cache: the identity policy (the uncompressed baseline)."""

from dataclasses import dataclass

from .base import Policy
from .view import LayerView


@dataclass(kw_only=True)
class Full(Policy):
    """Keeps every token. With it, generation is token-for-token the same as without vlcache."""

    name = "full"
    paper = ""
    needs_budget = False

    def __post_init__(self):
        super().__post_init__()
        if self.prune_at is not None:
            raise ValueError("full keeps every token, so it has nothing to prune at a layer: use a scoring policy")

    def score(self, view: LayerView):
        return None
