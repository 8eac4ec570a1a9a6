"""What every policy shares: the hooks, budgets and top-k (the view it is shown and the selection it returns are in
`view.py`).

A policy is a dataclass of settings. The integration calls three hooks, each returning `{layer: Selection}` (or
None for "keep everything"):

- `on_prefill(view)`: in every layer, right after that layer's prefill attention (the common case: score the
  prompt, keep the best, free the rest before the next layer runs);
- `after_prefill(request)`: once all layers have seen the prompt (VL-Cache's global per-layer budgets);
- `on_append(view)`: after every later forward (decode steps, a chat's next turn), for methods that keep the
  cache at a budget while generating (H2O, StreamingLLM, Elastic Cache, CAKE).

Policies see tensors and the `Layout` only, so they are testable without transformers.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, fields, replace
from typing import ClassVar

import torch

from ..modality import Layout
from ..quant.config import check_bits, check_settings
from .budget import check_amount, per_head, rank_desc, resolve, select_indices
from .heads import HEAD_BUDGETS, adaptive_head_budgets
from .hold import Hold, hold_of
from .lookahead import Lookahead, hold_for_lookahead
from .view import Eviction, EvictionState, LayerView, Plan, Request, Selection

PROTECTABLE = ("markers", "question")
BUDGET_FIELDS = ("budget", "vision_budget", "text_budget")  # the amounts every policy takes (labels list them first)
TEMPORAL_MODES = ("drop", "mean")
LOOKAHEAD_RULES = ("union", "mix")
IN_PLACE_MAX = 64  # decode-time evictions above this many slots per head compact instead (a chat's next turn, say)


@dataclass(kw_only=True)
class Policy(Lookahead):
    """Base of every policy. Budget settings shared by all:

    - budget: kept per layer, a ratio of the prompt in (0, 1] or a token count >= 1.
    - vision_budget / text_budget: separate amounts for vision tokens and text tokens, instead of `budget`;
      a modality without an amount is kept whole. An amount bounds what the method itself never evicts in that
      modality too (SnapKV's observation window, StreamingLLM's sinks reaching into a video); protected tokens
      are kept whatever the amount. Decode-time methods hold each modality at its own while decoding (hold.py):
      generated tokens are text, so a vision amount alone evicts nothing after the prefill.
    - protect: token groups never evicted, from ("markers", "question"); () lets everything compete.
    - frame_min: every image and video frame keeps at least this many of its best-scoring tokens (0: off), so
      no frame disappears entirely; they count against the budget.
    - head_budgets ("uniform"): "adaptive" moves a layer's prefill budget between its KV heads (Ada-KV): the
      layer keeps its best-scoring entries over all heads together, so a head with concentrated scores keeps
      fewer and one that spreads its attention more. The cache stores the largest head's count in every head
      (the others' extra slots are masked), so memory follows the largest head, not the average.
    - head_floor (0.2): with "adaptive", the share of the even per-head budget each head takes first (Ada-KV's
      safeguard against a head losing everything).

    Settings that make the prefill itself cheaper (FastV / PyramidDrop, FrameFusion / DyCoke style):

    - prune_at (None): a decoder layer index K. After layer K's attention the policy's selection there (its own
      scores, one choice for every KV head, its per-layer budget before any layer-adaptive spread) also drops the
      evicted tokens from the hidden states: layers after K compute on the kept tokens only and cache exactly
      them. Layers up to K compress as usual; the policy manages only them while decoding.
    - temporal_merge (None): a cosine threshold in (0, 1]. Before the language model, a video-frame (or image)
      token whose projected embedding has at least this cosine similarity with the token at the same place in
      the frame that last kept that place is dropped, so the model never sees it. Applies to every policy,
      `full` included. Frames are the spans of one video, or consecutive images of the same token count.
    - temporal_mode ("drop"): "drop" removes such tokens; "mean" also folds each into the token it matched
      (the kept embedding becomes the mean of its group).

    Lookahead scoring (the queries that matter are the ones that will be generated):

    - lookahead (0): g. The prompt stays whole for the first g generated tokens; the queries of those tokens join
      the policy's scoring rows, and each layer is cut right before its attention in the g-th decode step, so
      only g - 1 tokens are computed over the whole cache (the first one comes from the prompt's forward in any
      case). Policies that score by attention from a set of rows take it: SnapKV, PyramidKV, VL-Cache.
    - lookahead_rule ("union"): how the two sides choose. "union": each KV head takes the best slots of the
      generated rows' ranking and of the prompt rows' ranking in turn (in proportion share : 1 - share; a slot
      both want counts once, ties go to the mix below), so each side keeps its own top picks whatever the size
      of its attention values; with head_budgets="adaptive" a KV head's budget follows its strongest query head
      (the group's max of the mix), not the group's mean, which halves the one head that finds the answer. "mix":
      one ranking by (1 - share) x the prompt rows' mean attention + share x the generated rows' mean attention.
    - lookahead_share (0.5): the generated rows' share (of the union's turns, or of the mix); 1.0 scores by the
      generated rows alone (as Lookahead Q-Cache scores by its pseudo queries alone).
    - lookahead_draft (False): no waiting (after Lookahead Q-Cache, Wang et al., EMNLP 2025, arXiv 2505.20334):
      right after the prompt, g tokens are drafted greedily, each draft row attending in every layer only over the
      cut that the rows so far give (a provisional cut; one draft is exactly lookahead=1); the drafts' queries join
      the scoring rows, every layer is cut, and the drafts are dropped, so generation starts over the final cache
      and no step attends over the whole one. Costs g draft forwards over provisional cuts.

    KV quantization of what is kept (KIVI / VidKV style, after selection and merging, right after the prefill):

    - vision_bits / text_bits (16, 16): bits per entry of the kept vision / text entries, from (16, 8, 4, 2);
      16 leaves them as the model computed them. Generated tokens are text.
    - quant_group (None): G. Keys are quantized per channel over runs of G slots, values per slot over runs of G
      channels (or per channel, see value_axis); a scale and a zero point per group. None: 32, or the head dim if
      it is smaller. Must divide the head dim (checked when attached to a model).
    - quant_residual (128): the most recent generated tokens stay in full precision; once G more have arrived
      than this, the oldest G are quantized together.
    - value_axis ("token"): "token" quantizes values per slot (KIVI); "channel" like keys (VidKV's choice for video).
    """

    budget: float | int | None = None
    vision_budget: float | int | None = None
    text_budget: float | int | None = None
    protect: tuple[str, ...] = PROTECTABLE
    frame_min: int = 0
    head_budgets: str = "uniform"
    head_floor: float = 0.2
    lookahead: int = 0
    lookahead_share: float = 0.5
    lookahead_rule: str = "union"
    lookahead_draft: bool = False
    prune_at: int | None = None
    temporal_merge: float | None = None
    temporal_mode: str = "drop"
    vision_bits: int = 16
    text_bits: int = 16
    quant_group: int | None = None
    quant_residual: int = 128
    value_axis: str = "token"

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_budget: ClassVar[bool] = True
    # scores are attention sums over a set of query rows, which generated rows can join (`lookahead`)
    looks_ahead: ClassVar[bool] = False
    # decode-time scores read slots by position, never by slot order (no pooling over neighbouring slots, no
    # "last slots are recent"): evictions may then fill the holes in place (`Eviction`)
    order_free: ClassVar[bool] = False

    def __post_init__(self):
        check_amount("budget", self.budget)
        check_amount("vision_budget", self.vision_budget)
        check_amount("text_budget", self.text_budget)
        if self.needs_budget:
            if self.budget is None and self.vision_budget is None and self.text_budget is None:
                raise ValueError(f"{type(self).__name__} needs budget= (or vision_budget= / text_budget=)")
            if self.budget is not None and (self.vision_budget is not None or self.text_budget is not None):
                raise ValueError("give either budget= or per-modality vision_budget=/text_budget=, not both")
        self.protect = tuple(self.protect)
        bad = [p for p in self.protect if p not in PROTECTABLE]
        if bad:
            raise ValueError(f"protect={bad} not understood; choose from {PROTECTABLE}")
        if self.frame_min < 0:
            raise ValueError(f"frame_min must be >= 0, got {self.frame_min}")
        if self.head_budgets not in HEAD_BUDGETS:
            raise ValueError(f"head_budgets must be one of {HEAD_BUDGETS}, got {self.head_budgets!r}")
        f = self.head_floor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or math.isnan(f) or not 0.0 <= f <= 1.0:
            raise ValueError(f"head_floor must be a share in [0, 1], got {f!r}")
        if self.prune_at is not None and (
            isinstance(self.prune_at, bool) or not isinstance(self.prune_at, int) or self.prune_at < 0
        ):
            raise ValueError(f"prune_at must be a decoder layer index >= 0, got {self.prune_at!r}")
        if isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int) or self.lookahead < 0:
            raise ValueError(f"lookahead must be a number of generated tokens >= 0, got {self.lookahead!r}")
        w = self.lookahead_share
        if isinstance(w, bool) or not isinstance(w, (int, float)) or math.isnan(w) or not 0.0 <= w <= 1.0:
            raise ValueError(f"lookahead_share must be a share in [0, 1], got {w!r}")
        if self.lookahead and not self.looks_ahead:
            raise ValueError(
                f"{type(self).__name__} does not score by attention from a set of rows that generated tokens could "
                "join: lookahead works with snapkv, pyramidkv and vlcache"
            )
        if self.lookahead_rule not in LOOKAHEAD_RULES:
            raise ValueError(f"lookahead_rule must be one of {LOOKAHEAD_RULES}, got {self.lookahead_rule!r}")
        if not isinstance(self.lookahead_draft, bool):
            raise ValueError(f"lookahead_draft must be True or False, got {self.lookahead_draft!r}")
        if self.lookahead_draft and not self.lookahead:
            raise ValueError("lookahead_draft drafts the first `lookahead` tokens: set lookahead >= 1 with it")
        if self.lookahead_draft and (self.vision_bits < 16 or self.text_bits < 16):
            raise ValueError("lookahead_draft attends over full-precision entries: drop vision_bits / text_bits")
        if self.lookahead and self.prune_at is not None:
            raise ValueError("prune_at cuts the prompt during the prefill, lookahead after it: choose one")
        if self.temporal_merge is not None:
            t = self.temporal_merge
            if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or not 0.0 < t <= 1.0:
                raise ValueError(f"temporal_merge must be a cosine threshold in (0, 1], got {t!r}")
        if self.temporal_mode not in TEMPORAL_MODES:
            raise ValueError(f"temporal_mode must be one of {TEMPORAL_MODES}, got {self.temporal_mode!r}")
        check_bits("vision_bits", self.vision_bits)
        check_bits("text_bits", self.text_bits)
        check_settings(self.quant_group, self.quant_residual, self.value_axis)

    @property
    def decodes(self) -> bool:
        """Whether the policy acts after decode steps too (`on_append`: H2O, StreamingLLM, CAKE, Elastic Cache,
        compositions with their schedules); the integration skips the per-step hook for the others."""
        return type(self).on_append is not Policy.on_append

    @property
    def quantizes(self) -> bool:
        """Whether the kept entries are quantized after the prefill (any modality below 16 bits)."""
        return self.vision_bits < 16 or self.text_bits < 16

    # ------------------------------------------------------------------ hooks

    def on_prefill(self, view: LayerView) -> dict[int, Selection] | None:
        if self.lookahead:  # keep the prompt whole; its scoring rows' attention waits for the generated rows'
            hold_for_lookahead(view, *self.observed(view))
            return None
        scores = self.score(view)
        if scores is None:
            return None
        return {view.layer: self.select(view, self.plan(view), scores)}

    def after_prefill(self, request: Request) -> dict[int, Selection] | None:
        return None

    def cut(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prune_at: the prompt slots [B, m] (ascending) whose hidden states go on past this layer, and which of
        them are filler [B, m] (kept only so every row has m; None if none). One choice for all KV heads (the
        hidden state of a token is dropped whole): the heads' scores are averaged. The budget is the policy's
        nominal one (`Policy.plan`, before PyramidKV's or VL-Cache's spread over layers); the last prompt token
        always goes on (its hidden state gives the first generated token)."""
        scores = self.cut_scores(view)
        B, T = view.slot_valid.shape[0], view.slots
        if scores is None:
            return torch.arange(T, device=view.keys.device).expand(B, T), None
        shared = torch.nan_to_num(scores.float(), nan=float("-inf")).mean(1, keepdim=True)  # [B, 1, T]
        one = replace(view, slot_valid=view.slot_valid[:, :1], positions=view.positions[:, :1])
        plan = Policy.plan(self, one)
        last = torch.zeros_like(plan.forced)
        last[:, -1] = True
        plan = Plan(plan.forced | (last & view.layout.valid), plan.pools)
        sel = self.select(one, plan, shared)
        return sel.indices[:, 0], None if sel.filler is None else sel.filler[:, 0]

    def cut_scores(self, view: LayerView) -> torch.Tensor | None:
        """[B, Hk, T] the scores `cut` ranks by (default: `score`). Called right after `on_prefill` of the same
        layer, so it may reuse what that stored in `view.slot_state`."""
        return self.score(view)

    def on_append(self, view: LayerView) -> dict[int, Selection] | None:
        return None

    def appended_since_eviction(self, state: dict) -> int:
        """Tokens a layer (its `view.state`) took in since this policy last evicted there: compiled decode starts
        its own count from it (a chat's next turn, a cache that grew), so it evicts at the steps eager decoding
        would. 0 for a policy that does not evict while decoding."""
        return 0

    def evicts_in(self, state: dict) -> bool:
        """Whether decoding may still evict from a layer (its `view.state`): compiled decode leaves the graph only
        for such layers. False for a policy that does not act while decoding."""
        return False

    # ------------------------------------------------------------------ pieces subclasses override

    def score(self, view: LayerView) -> torch.Tensor | None:
        """[B, Hk, T] importance of every slot (higher is kept first), or None to keep everything."""
        raise NotImplementedError

    def always_keep(self, view: LayerView, total: torch.Tensor) -> torch.Tensor | None:
        """[B, n] prompt positions the method itself never evicts (its recent window, its sinks), or None.
        `total` [B] is the layer's budget, for windows sized as a share of it."""
        return None

    # ------------------------------------------------------------------ budgets and selection

    def settings(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def changed_settings(self) -> dict:
        """The settings other than the budgets that differ from their defaults (what tells two runs of one method
        apart in labels and records)."""
        out = {}
        for f in fields(self):
            if f.name in BUDGET_FIELDS:
                continue
            default = f.default if f.default is not MISSING else f.default_factory()
            if getattr(self, f.name) != default:
                out[f.name] = getattr(self, f.name)
        return out

    def protected(self, layout: Layout) -> torch.Tensor:
        """[B, n] the protected prompt tokens."""
        out = torch.zeros_like(layout.valid)
        if "markers" in self.protect:
            out |= layout.marker
        if "question" in self.protect:
            out |= layout.question
        return out

    def total_budget(self, layout: Layout) -> torch.Tensor:
        """[B] tokens kept per layer at weight 1: the resolved budget, or the sum of the per-modality amounts
        (a modality without an amount counting whole)."""
        valid = layout.valid
        if self.budget is not None:
            return resolve(self.budget, valid.sum(-1))
        total = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
        for modality, amount in ((layout.vision & valid, self.vision_budget), (layout.text, self.text_budget)):
            n = modality.sum(-1)
            total = total + (n if amount is None else resolve(amount, n))
        return total

    def plan(self, view: LayerView, *, total: torch.Tensor | None = None, weight: float = 1.0) -> Plan:
        """The prefill budget of this layer in prompt space (slots == prompt positions at prefill).

        total [B]: this layer's budget when the method sets it per layer (single `budget` only); weight: scales
        the budget otherwise (per-modality amounts included), for layer-adaptive methods.
        """
        layout = view.layout
        valid = layout.valid
        if total is None:
            total = self.total_budget(layout)
            if weight != 1.0:
                total = torch.floor(total.double() * weight).long()
        protected = self.protected(layout)
        extra = self.always_keep(view, total)
        if self.budget is not None:
            forced = (protected | extra if extra is not None else protected) & valid
            pool = valid & ~forced
            k = (total - forced.sum(-1)).clamp(min=0)
            return Plan(forced, [(pool, torch.minimum(k, pool.sum(-1)))])
        modalities = []
        for modality, amount in ((layout.vision & valid, self.vision_budget), (layout.text, self.text_budget)):
            want = None
            if amount is not None:
                want = resolve(amount, modality.sum(-1))
                if weight != 1.0:
                    want = torch.floor(want.double() * weight).long()
            modalities.append((modality, want))
        forced = protected & valid
        if extra is not None:
            # the method's own sinks or window stay within each modality's amount: a 32-row window reaching into
            # the video kept 16 of 128 vision tokens at vision_budget=0.01. Sinks are the prompt's first tokens and
            # windows its last, so those nearest either end stay first.
            extra = extra & valid & ~forced
            index = valid.long().cumsum(-1) - 1  # among the real tokens (left padding)
            to_end = torch.minimum(index, valid.sum(-1, keepdim=True) - 1 - index)
            for modality, want in modalities:
                inside = extra & modality
                if want is not None:
                    room = (want - (forced & modality).sum(-1)).clamp(min=0)
                    order = torch.sort(to_end.masked_fill(~inside, valid.shape[-1]), dim=-1, stable=True).indices
                    rank = order.argsort(-1)
                    inside = inside & (rank < room[:, None])
                forced = forced | inside
        pools = []
        for modality, want in modalities:
            pool = modality & ~forced
            k = pool.sum(-1) if want is None else (want - (forced & modality).sum(-1)).clamp(min=0)
            pools.append((pool, torch.minimum(k, pool.sum(-1))))
        return Plan(forced, pools)

    def select(self, view: LayerView, plan: Plan, scores: torch.Tensor) -> Selection:
        """Kept slots of a prefill plan: the forced ones, each frame's minimum, then the best of each pool."""
        if self.frame_min > 0:
            plan = self._with_frame_minimum(view, plan, scores)
        if self.head_budgets == "adaptive" and scores.shape[1] > 1:
            Hk = scores.shape[1]
            pools = []
            for mask, k in plan.pools:
                pool = per_head(mask, Hk) & view.slot_valid & ~per_head(plan.forced, Hk)
                pools.append((pool, adaptive_head_budgets(scores, pool, k, self.head_floor)))
            plan = Plan(plan.forced, pools)
        return Selection(*select_indices(scores, plan.forced, plan.pools, view.slot_valid, with_filler=True))

    def _with_frame_minimum(self, view: LayerView, plan: Plan, scores: torch.Tensor) -> Plan:
        """Force each vision span's top-`frame_min` slots (per KV head) and take them out of their pool's k.
        Spans are found through slot positions, so this works on a compacted layer too."""
        Hk = scores.shape[1]
        before = per_head(plan.forced, Hk) & view.slot_valid
        forced = before.clone()
        pos = view.positions
        for b, sample in enumerate(view.layout.samples):
            for span in sample.spans:
                inside = (pos[b] >= span.start) & (pos[b] < span.end)  # [Hk, T]
                m = min(self.frame_min, int(inside[0].sum()))
                if m:  # ties to the lower position, as every other selection (topk's tie order is arbitrary)
                    s = torch.nan_to_num(scores[b].float(), nan=float("-inf")).masked_fill(~inside, float("-inf"))
                    forced[b] |= inside & (rank_desc(s) < m)
        added = forced & ~before
        pools = []
        for mask, k in plan.pools:
            mk = per_head(mask, Hk)
            pools.append((mk & ~forced, (k.view(-1, 1) - (added & mk).sum(-1)).clamp(min=0)))
        return Plan(forced, pools)

    def growth_budget(self) -> Hold:
        """What a decode-time method holds a layer at (hold.py): what the prefill left there, in all or per modality,
        per KV head; a token-count amount larger than that lets the cache first grow up to it. A ratio is fixed by
        the prompt length."""
        return hold_of(self)

    def keep_at_budget(self, view: LayerView, hold: Hold | torch.Tensor, scores: torch.Tensor, forced: torch.Tensor):
        """Decode-time eviction: where a row (and KV head) holds more real tokens than `hold` allows (a `Hold`, in all
        or per modality, or [B] real tokens in all), keep the `forced` slots ([B, Hk, T]) and the best-scoring others
        of that group, down to its size (forced slots are kept even past it); the entries of a modality no amount
        holds are kept."""
        valid = view.slot_valid
        if isinstance(hold, torch.Tensor):
            groups = [(valid, hold.view(-1, 1))]
            unheld = None
        else:
            groups = hold.groups(view)
            unheld = hold.unheld(view)
        if not groups:
            return None
        over = torch.stack([(mask.sum(-1) > held).any() for mask, held in groups])
        if not bool(over.any()):
            return None
        forced = (forced | unheld if unheld is not None else forced) & valid
        pools = []
        for mask, held in groups:
            k = (held - (forced & mask).sum(-1)).clamp(min=0)  # [B, Hk]
            pool = mask & ~forced
            pools.append((pool, torch.minimum(k, pool.sum(-1))))
        if self.order_free:
            # the steady state drops as many slots as tokens arrived (one a step), the same number in every row
            # and head, from one group: drop its lowest-scoring ones in place rather than copy the whole layer
            # every step. Ties may fall otherwise than in select_indices (H2O's sums hardly tie, StreamingLLM's
            # positions never).
            drops = torch.stack([pool.sum(-1) - k for pool, k in pools])  # [G, B, Hk]
            low, high = (x.tolist() for x in (drops.flatten(1).amin(-1), drops.flatten(1).amax(-1)))  # one sync
            dropping = [g for g in range(len(pools)) if high[g] > 0]
            if len(dropping) == 1 and 0 < high[dropping[0]] <= IN_PLACE_MAX and low[dropping[0]] == high[dropping[0]]:
                pool = pools[dropping[0]][0]
                s = torch.nan_to_num(scores.float(), nan=float("-inf")).masked_fill(~pool, float("inf"))
                return {view.layer: Eviction(s.topk(high[dropping[0]], dim=-1, largest=False).indices)}
        return {view.layer: Selection(*select_indices(scores, forced, pools, valid, with_filler=True))}


@dataclass(kw_only=True)
class DecodeEvicting(Policy):
    """Base of the methods that hold the cache at its budget while decoding (StreamingLLM, H2O, Elastic Cache, CAKE).

    - evict_every (1): evict once every this many appended tokens, that many at a time, instead of one a step as
      the papers do. Between evictions the cache runs up to `evict_every - 1` tokens over its budget. Scores that
      accumulate (H2O's) still take in every step's attention; what is saved is the per-step selection, masks and
      eviction or compaction: dozens of small operations per layer and step, each a kernel launch on a GPU (on an
      H100 at 33K tokens, every 16 tokens took CAKE's decode from 2.3x to 0.85x the full cache's; H2O's, whose cost
      is its per-step score pass, only from 3.1x to 2.9x). 1 is the papers' behaviour.
    """

    evict_every: int = 1

    State: ClassVar[type] = EvictionState  # the per-layer state (`layer_state`); methods extend it

    def layer_state(self, view: LayerView):
        """This method's typed state of `view`'s layer for the request, made on first use."""
        state = view.state.get("policy")
        if state is None:
            state = view.state["policy"] = self.State()
        return state

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.evict_every, bool) or not isinstance(self.evict_every, int) or self.evict_every < 1:
            raise ValueError(f"evict_every must be an integer >= 1, got {self.evict_every!r}")

    def appended_since_eviction(self, state: dict) -> int:
        held = state.get("policy")
        return held.pending if held is not None else 0

    def evicts_in(self, state: dict) -> bool:
        held = state.get("policy")
        return held is None or held.evicts  # (None: not started, so not known to be idle)

    def eviction_due(self, view: LayerView) -> bool:
        """Whether this append evicts: once `evict_every` tokens have arrived since the last eviction (a chat's
        next turn, many tokens in one forward, is due at once)."""
        state = self.layer_state(view)
        state.pending += view.new
        if state.pending >= self.evict_every:
            state.pending = 0
            return True
        return False


def cut_to_plans(request: Request, plans: dict[int, Plan], seen: int, cut) -> dict[int, Selection]:
    """Cut each layer of `plans` (prompt-space budgets) to its plan, mapped onto the slots it holds now;
    `cut(view, plan)` gives the selection. While layers are still arriving (`seen` below all of them), a layer
    already within its share is left as it is."""
    out = {}
    for layer, plan in plans.items():
        view = request.view(layer)
        if seen < len(request.layers) and bool((view.slot_valid[:, 0].sum(-1) <= plan.kept()).all()):
            continue
        out[layer] = cut(view, plan.to_slots(view))  # the layer may hold fewer slots than the prompt by now
    return out
