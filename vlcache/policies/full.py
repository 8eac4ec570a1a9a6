"""Full cache: the identity policy (the uncompressed baseline)."""

from dataclasses import dataclass

from .base import LayerView, Policy


@dataclass(kw_only=True)
class Full(Policy):
    """Keeps every token. With it, generation is token-for-token the same as without vlcache."""

    name = "full"
    paper = ""
    needs_budget = False

    def score(self, view: LayerView):
        return None
