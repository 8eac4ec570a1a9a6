"""What becomes of the entries a cut evicts: dropped, LOOK-M's similarity merging, Elastic Cache's anchors."""

from __future__ import annotations

from ..base import Policy
from ..elastic import ElasticCache
from ..lookm import LOOKM
from ..view import LayerView, Plan, Selection
from . import register_merger
from .kinds import Merger


@register_merger("none")
class Drop(Merger):
    """Evicted entries are dropped."""


@register_merger("lookm")
class SimilarityMerge(Merger):
    """LOOK-M: each evicted entry folds into the kept key it is most similar to (`merge`, `merge_filter`)."""

    uses = LOOKM

    def merge(self, policy: Policy, view: LayerView, sel: Selection, plan: Plan) -> Selection:
        if self.method.merge == "none":
            return sel
        return self.method.merge_evicted(view, sel)


@register_merger("elastic")
class AnchorMerge(Merger):
    """Elastic Cache: each evicted entry folds into the kept anchor nearest by position (forced slots are not
    anchors)."""

    uses = ElasticCache

    def merge(self, policy: Policy, view: LayerView, sel: Selection, plan: Plan) -> Selection:
        # one layer cut once: its slots are prompt positions, so a prompt-space forced mask applies as it is
        forced = plan.forced if plan.forced.ndim == 2 else plan.forced[:, 0]
        return self.method.merge_into_anchors(view, sel, forced)
