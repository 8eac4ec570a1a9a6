"""What every policy shares: the view of one layer it is shown, the selection it returns, budgets and top-k.

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
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import ClassVar

import torch

from .. import kernels
from ..modality import Layout
from ..quant.config import check_bits, check_settings
from .budget import check_amount, rank_desc, resolve
from .heads import HEAD_BUDGETS, adaptive_head_budgets

PROTECTABLE = ("markers", "question")
BUDGET_FIELDS = ("budget", "vision_budget", "text_budget")  # the amounts every policy takes (labels list them first)
TEMPORAL_MODES = ("drop", "mean")
LOOKAHEAD_RULES = ("union", "mix")
IN_PLACE_MAX = 64  # decode-time evictions above this many slots per head compact instead (a chat's next turn, say)


@dataclass
class Selection:
    """What one layer keeps: `indices` [B, Hk, K] into its current slots, ascending. When `keys`/`values`
    ([B, Hk, K, d]) are given they replace the gathered entries (merging policies). `filler` [B, Hk, K] marks
    slots a row holds only so that every row has K slots: they are masked out as padding is."""

    indices: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    filler: torch.Tensor | None = None


@dataclass
class Eviction:
    """What one layer drops while decoding: `slots` [B, Hk, E], E per row and head. The layer moves its last
    surviving entries into the holes instead of copying every survivor (`Selection`), so the slots no longer
    follow the sequence order: only for policies whose scores do not depend on it (`Policy.order_free`)."""

    slots: torch.Tensor


@dataclass
class LayerStatistics:
    """A per-layer statistic of the prompt, per prompt in the batch (VL-Cache's densities, CAKE's preferences):
    what a layer-splitting allocator measures in each layer before it splits the budget."""

    by_layer: dict[int, list[float]] = field(default_factory=dict)

    def rows(self, layers: list[int]) -> list[list[float]]:
        """Per prompt, the value of each of `layers`."""
        return [list(r) for r in zip(*[self.by_layer[layer] for layer in layers])]


@dataclass
class LookaheadState:
    """One layer waiting for generated rows (`lookahead`): steps seen, whether it was cut, the budget to cut to
    when a layer-splitting allocator set it after the prefill."""

    steps: int = 0
    done: bool = False
    plan: Plan | None = None


@dataclass
class EvictionState:
    """What a decode-time method carries for one layer between steps: tokens appended since its last eviction."""

    pending: int = 0


@dataclass
class Request:
    """What a policy may reach beyond the layer in hand, for one request (one prompt batch).

    - layers: indices of the compressible layers, in order.
    - shared: one dict for the policy's cross-layer state (densities, preferences).
    - view(l): a fresh view of layer l as it is now (no query rows), to re-select a layer that was already
      compacted (CAKE's cascading) or to select every layer at once (VL-Cache).
    """

    layers: list[int]
    shared: dict
    view: Callable[[int], LayerView]


@dataclass
class LayerView:
    """One decoder layer as a policy sees it, right after an attention forward.

    - query [B, H, q, d]: the post-RoPE queries of the rows this forward computed (the whole prompt at prefill).
    - keys / values [B, Hk, T, d]: the layer's cache after appending them (post-RoPE keys, as HF stores them).
    - positions [B, Hk, T]: the original sequence position of every slot. slot_valid [B, Hk, T]: False at padding.
    - layer: index in the model (and in the cache); depth / num_layers: rank among the compressible layers
      (sliding-window layers are left out), which is what layer-adaptive budgets are spread over.
    - new: query rows this forward computed. They are the last `new` slots, unless `query_positions` [B, new]
      says which slots they are (image reuse recomputes a subset of a prompt whose other slots were spliced in).
    - state: this layer's persistent dict for the request (a policy keeps one typed object in it: `Policy.layer_state`,
      `LookaheadState`); shared: one dict shared by all layers of the request.
    - slot_state: per-slot tensors [B, Hk, T] that the cache keeps aligned (gathered on compaction, zero-extended
      on append), for scores that accumulate while decoding.
    """

    layer: int
    depth: int
    num_layers: int
    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    scale: float
    layout: Layout
    positions: torch.Tensor
    slot_valid: torch.Tensor
    new: int
    state: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
    slot_state: dict = field(default_factory=dict)
    request: Request | None = None
    query_positions: torch.Tensor | None = None
    all_valid: bool = False  # known on the host: no padding and no filler slots (slot_valid is all True)

    @property
    def slots(self) -> int:
        return self.keys.shape[2]

    @property
    def kv_heads(self) -> int:
        return self.keys.shape[1]

    def query_slots(self, rows: slice | None = None) -> torch.Tensor:
        """[B, R] slot index of the query rows (for causal masking)."""
        if self.query_positions is not None:
            s = self.query_positions
            return s if rows is None else s[:, rows]
        B, T = self.keys.shape[0], self.slots
        s = torch.arange(T - self.new, T, device=self.keys.device)
        if rows is not None:
            s = s[rows]
        return s.expand(B, -1)

    def query_valid(self, rows: slice | None = None) -> torch.Tensor:
        """[B, R] False for query rows that are padding."""
        slots = self.query_slots(rows)
        return self.slot_valid[:, 0].gather(1, slots.to(self.slot_valid.device))

    def key_valid(self) -> torch.Tensor:
        """[B, T] if every KV head holds the same slots' validity, else [B, Hk, T]."""
        v = self.slot_valid
        if self.all_valid:  # no device sync on every decode step of every layer
            return v[:, 0]
        return v[:, 0] if bool((v == v[:, :1]).all()) else v

    def prompt_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A prompt mask [B, n] moved to slot space [B, Hk, T]; slots of generated tokens are False."""
        n = mask.shape[1]
        pos = self.positions
        inside = (pos >= 0) & (pos < n)  # filler slots (position -1) belong to no token
        return mask.gather(1, pos.clamp(0, n - 1).flatten(1)).view_as(pos) & inside

    def probs(self, rows: slice) -> torch.Tensor:
        """Attention probabilities of some of this forward's query rows, [B, H, R, T] fp32 (small R only)."""
        return kernels.attention_probs(
            self.query[:, :, rows], self.keys, self.scale, self.query_slots(rows), self.key_valid()
        )

    def stats(self, rows: slice | None = None, **kw) -> kernels.AttentionStats:
        """Tiled attention column statistics over this forward's query rows (all of them by default)."""
        q = self.query if rows is None else self.query[:, :, rows]
        return kernels.attention_stats(
            q, self.keys, self.scale, self.query_slots(rows), self.key_valid(), self.query_valid(rows), **kw
        )


@dataclass
class Plan:
    """Budget of one layer in slot space: `forced` [B, T] slots that are always kept, and pools of candidates
    (mask [B, T], how many to keep per row [B]) among which the best-scoring are kept."""

    forced: torch.Tensor
    pools: list[tuple[torch.Tensor, torch.Tensor]]

    def kept(self) -> torch.Tensor:
        """[B] slots kept per row (for a prompt-space plan; per head it is the same)."""
        k = self.forced.sum(-1)
        for _, n in self.pools:
            k = k + n
        return k

    def to_slots(self, view: LayerView, keep_generated: bool = False) -> Plan:
        """This prompt-space plan mapped onto the current slots of `view`'s layer ([B, Hk, T] masks): what a
        policy needs to select again in a layer that was already compacted. Slots of generated tokens are in no
        pool; with `keep_generated` they are forced (a cut after some decode steps keeps what was generated).
        Only real slots are forced: padding and filler never are."""
        forced = view.prompt_mask(self.forced)
        if keep_generated:
            forced = forced | (view.positions >= view.layout.length)
        return Plan(forced & view.slot_valid, [(view.prompt_mask(m), k) for m, k in self.pools])


@dataclass(kw_only=True)
class Policy:
    """Base of every policy. Budget settings shared by all:

    - budget: kept per layer, a ratio of the prompt in (0, 1] or a token count >= 1.
    - vision_budget / text_budget: separate amounts for vision tokens and text tokens, instead of `budget`;
      a modality without an amount is kept whole. An amount bounds what the method itself never evicts in that
      modality too (SnapKV's observation window, StreamingLLM's sinks reaching into a video); protected tokens
      are kept whatever the amount.
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

    def lookahead_step(self, view: LayerView) -> dict[int, Selection] | None:
        """Before a decode step's attention in this layer (`lookahead` only): add the new rows' attention to the
        scoring rows'; on the g-th generated token, cut the layer to its budget (generated tokens are kept)."""
        rows = view.probs(slice(None)).sum(2)  # [B, H, T]
        gen = view.slot_state.get("lookahead_gen")
        gen = rows if gen is None else gen + rows
        st = lookahead_state(view)
        st.steps += view.new
        steps = st.steps
        if steps < self.lookahead:
            view.slot_state["lookahead_gen"] = gen
            return None
        return self.lookahead_cut(view, gen, steps)

    def lookahead_cut(self, view: LayerView, gen: torch.Tensor, steps: int) -> dict[int, Selection]:
        """Cut the layer by the prompt's scoring rows and `steps` generated (or drafted) rows, whose attention
        summed over them is `gen` [B, H, T]; generated tokens are kept."""
        sel = self.lookahead_select(view, self.lookahead_plan(view).to_slots(view, keep_generated=True), gen, steps)
        view.slot_state.pop("lookahead")  # per query head: not kept aligned by compaction
        view.slot_state.pop("lookahead_gen", None)
        lookahead_state(view).done = True
        return {view.layer: sel}

    def lookahead_select(self, view: LayerView, plan: Plan, gen: torch.Tensor | None, steps: int) -> Selection:
        """What a lookahead cut keeps within `plan` (slot space): by the prompt's scoring rows' mean attention
        (`view.slot_state["lookahead"]`, [B, H, T]) and that of `steps` generated rows summed in `gen`, combined by
        `lookahead_rule`; by the prompt's rows alone without generated ones."""
        prompt = view.slot_state["lookahead"]
        if gen is None or steps == 0:
            return self.select(view, plan, self.ranked(view, prompt))
        s, gen = self.lookahead_share, gen / steps
        mix = (1.0 - s) * prompt + s * gen
        lin = self.ranked(view, mix)
        if self.lookahead_rule == "mix" or s in (0.0, 1.0):
            return self.select(view, plan, lin)
        if self.frame_min > 0:  # each frame's minimum by the mix, then the union for the rest
            plan = self._with_frame_minimum(view, plan, lin)
        Hk, T = view.kv_heads, view.slots
        forced = per_head(plan.forced, Hk) & view.slot_valid
        by_prompt, by_gen = self.ranked(view, prompt), self.ranked(view, gen)
        strongest = kernels.group_reduce(mix, Hk, "max")  # what Ada-KV's per-head split follows
        key = torch.full(lin.shape, float("inf"), dtype=torch.float64, device=lin.device)
        pools = []
        for mask, k in plan.pools:
            pool = per_head(mask, Hk) & view.slot_valid & ~forced
            rp, rg, rl = (_pool_rank(x, pool) for x in (by_prompt, by_gen, lin))
            turn = torch.minimum(rg / s, rp / (1.0 - s))  # the turn at which either side would take the slot
            # turns as dense ranks (distinct turns differ by >= 1, whatever the share), then the mix's rank breaks
            # ties: one float64 key, exact for any cache a GPU holds
            turn = torch.unique(turn, return_inverse=True)[1].double()
            key = torch.where(pool, turn * (T + 1) + rl, key)
            if self.head_budgets == "adaptive" and Hk > 1:
                k = adaptive_head_budgets(strongest, pool, k, self.head_floor)
            pools.append((pool, k))
        scores = -rank_desc(-key).float()  # ranks (< 2^24) are exact in float32, which select_indices ranks in
        return Selection(*select_indices(scores, forced, pools, view.slot_valid, with_filler=True))

    def provisional_keep(self, view: LayerView, gen: torch.Tensor | None = None, steps: int = 0) -> torch.Tensor:
        """[B, Hk, T] the prompt slots a lookahead cut by the rows so far would keep, real ones only: what a draft
        step attends over (`lookahead_draft`)."""
        sel = self.lookahead_select(view, self.lookahead_plan(view).to_slots(view), gen, steps)
        kept = True if sel.filler is None else ~sel.filler
        keep = torch.zeros_like(view.slot_valid).scatter_(-1, sel.indices, kept)
        return keep & view.slot_valid & (view.positions < view.layout.length)

    # ------------------------------------------------------------------ pieces subclasses override

    def observed(self, view: LayerView) -> tuple[torch.Tensor, torch.Tensor]:
        """`looks_ahead` policies: ([B, H, T] the attention each slot receives from the prompt's scoring rows,
        summed over them, per query head; [B] how many rows that is): the rows generated tokens join."""
        raise NotImplementedError

    def ranked(self, view: LayerView, sums: torch.Tensor) -> torch.Tensor:
        """`looks_ahead` policies: [B, Hk, T] scores from `observed`'s sums (with the generated rows' added)."""
        raise NotImplementedError

    def lookahead_plan(self, view: LayerView) -> Plan:
        """The prompt-space budget a lookahead cut keeps in this layer: what a layer-splitting allocator set after
        the prefill (`LookaheadState.plan`), else `plan`."""
        plan = lookahead_state(view).plan
        return self.plan(view) if plan is None else plan

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
                if m:
                    top = scores[b].masked_fill(~inside, float("-inf")).topk(m, dim=-1).indices
                    forced[b].scatter_(-1, top, True)
        added = forced & ~before
        pools = []
        for mask, k in plan.pools:
            mk = per_head(mask, Hk)
            pools.append((mk & ~forced, (k.view(-1, 1) - (added & mk).sum(-1)).clamp(min=0)))
        return Plan(forced, pools)

    def growth_budget(self, view: LayerView, plan: Plan) -> torch.Tensor:
        """[B] real tokens a decode-time method holds the cache at: what the prefill kept, or a token-count budget
        larger than the prompt (then the cache first grows up to it). A ratio is fixed by the prompt length."""
        kept = plan.kept()
        if isinstance(self.budget, int):
            kept = kept.clamp(min=self.budget)
        return kept

    def keep_at_budget(self, view: LayerView, budget: torch.Tensor, scores: torch.Tensor, forced: torch.Tensor):
        """Decode-time eviction: if a row holds more than `budget` [B] real tokens, keep the `forced` slots
        ([B, Hk, T]) and the best-scoring others, down to the budget."""
        valid = view.slot_valid
        if bool((valid[:, 0].sum(-1) <= budget).all()):
            return None
        forced = forced & valid
        k = (budget.view(-1, 1) - forced.sum(-1)).clamp(min=0)  # [B, Hk]
        pool = valid & ~forced
        if self.order_free:
            # the steady state drops as many slots as tokens arrived (one a step), the same number in every row
            # and head: drop the lowest-scoring ones in place rather than copy the whole layer every step. Ties
            # may fall otherwise than in select_indices (H2O's sums hardly tie, StreamingLLM's positions never).
            drop = pool.sum(-1) - k
            low, e = torch.stack([drop.min(), drop.max()]).tolist()  # one device sync, not two
            if 0 < e <= IN_PLACE_MAX and low == e:
                s = torch.nan_to_num(scores.float(), nan=float("-inf")).masked_fill(~pool, float("inf"))
                return {view.layer: Eviction(s.topk(e, dim=-1, largest=False).indices)}
        return {view.layer: Selection(*select_indices(scores, forced, [(pool, k)], valid, with_filler=True))}


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

    def eviction_due(self, view: LayerView) -> bool:
        """Whether this append evicts: once `evict_every` tokens have arrived since the last eviction (a chat's
        next turn, many tokens in one forward, is due at once)."""
        state = self.layer_state(view)
        state.pending += view.new
        if state.pending >= self.evict_every:
            state.pending = 0
            return True
        return False


def hold_for_lookahead(view: LayerView, sums: torch.Tensor, rows: torch.Tensor) -> None:
    """Keep the prompt's scoring rows' mean attention [B, H, T] (`sums` over `rows` [B] rows) for the generated rows
    to join (`Policy.lookahead_step`); the layer stays whole until then."""
    view.slot_state["lookahead"] = sums / rows.clamp(min=1).view(-1, 1, 1).to(sums.dtype)


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


def lookahead_state(view: LayerView) -> LookaheadState:
    """The lookahead's state of `view`'s layer, made on first use."""
    state = view.state.get("lookahead")
    if state is None:
        state = view.state["lookahead"] = LookaheadState()
    return state


def _pool_rank(scores: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """[B, Hk, T] float64 rank of each slot among `pool`'s by `scores` (0 = best; NaN last); meaningless outside."""
    s = torch.nan_to_num(scores.float(), nan=float("-inf")).masked_fill(~pool, float("-inf"))
    return rank_desc(s).double()


def per_head(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T] -> [B, Hk, T] (a view); [B, Hk, T] is returned as is."""
    return mask[:, None, :].expand(mask.shape[0], heads, mask.shape[-1]) if mask.ndim == 2 else mask


def select_indices(
    scores: torch.Tensor,
    forced: torch.Tensor,
    pools: list[tuple[torch.Tensor, torch.Tensor]],
    slot_valid: torch.Tensor,
    with_filler: bool = False,
):
    """Kept slots [B, Hk, K], ascending: the forced slots plus the top-k of each pool by score, per KV head.

    scores [B, Hk, T]; forced and pool masks [B, T] or [B, Hk, T]; k [B] or [B, Hk]; slot_valid [B, Hk, T]. Rows of a
    batch may keep different numbers of real tokens; every row then holds K = the largest count, the shorter rows
    filling up with their padding slots, then with slots they did not choose. With `with_filler`, also returns
    the [B, Hk, K] mask of those filler slots (kept only for shape, to be masked out).
    """
    B, Hk, T = scores.shape
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    keep = per_head(forced, Hk).clone()
    for mask, k in pools:
        m = per_head(mask, Hk)
        rank = rank_desc(s.masked_fill(~m, float("-inf")))
        keep |= m & (rank < k.view(B, -1, 1))
    counts = keep.sum(-1)  # [B, Hk], equal across heads of a row
    K = int(counts.max()) if counts.numel() else 0
    if K == T:
        idx = torch.arange(T, device=scores.device).expand(B, Hk, T).contiguous()
    else:
        # order: kept, then padding, then the rest by score; the first K of that order survive
        group = torch.where(keep, 0, torch.where(slot_valid, 2, 1))
        key = group * (T + 1) + rank_desc(s)
        idx = torch.topk(key, K, dim=-1, largest=False).indices.sort(dim=-1).values
    if not with_filler:
        return idx
    filler = ~keep.gather(-1, idx) & slot_valid.gather(-1, idx)
    return idx, None, None, (filler if bool(filler.any()) else None)
