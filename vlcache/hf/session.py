"""A `Session` plugs a policy into a Hugging Face model for the time it is attached.

Attaching (1) switches the language model's attention to vlcache's wrapper of the same kind (sdpa or eager),
(2) puts forward hooks on the model: before a forward, it learns the prompt's modality layout (first forward on
a cache) or the padding of the appended tokens; after it, it runs the policy's whole-model step and marks the
prefill done, (3) makes `model.generate` hand a `CompressedCache` to generation when the caller passed none.
Compression itself happens inside the attention call of each layer, right after its prefill attention: the
layer's full keys are freed before the next layer runs.
"""

from __future__ import annotations

import contextlib
import threading
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..compression_stats import CompressionStats
from ..modality import family_for, layout_from_inputs
from ..policies import Policy
from ..quant.config import QuantConfig
from .attention import layer_mask, register
from .cache import CompressedCache, CompressibleLayer
from .compat import CACHE_KWARG, get_cache, pop_cache, tested_note, warn_if_hub_kernels, warn_if_untested
from .compiled_decode import CompiledDecode
from .draft import check_draftable, run_draft
from .merge import merge_inputs
from .model_parts import (
    attention_modules,
    check_reductions,
    decoder,
    new_tokens,
    set_text_implementation,
    text_config,
    unwrap_generate,
    vlcache_implementation,
    wrap_generate,
)
from .policy_runner import PolicyRunner
from .prune import cut_layer_inputs
from .quantized import QuantizedLayer
from .static_cache import StaticLayer, thaw
from .static_cache import attend as attend_static


def _decode_backends(query: torch.Tensor):
    """Keep PyTorch's sdpa off its cuDNN backend for the steps after the prompt: cuDNN builds an execution plan
    for every new (length, strides) shape, and a compressed cache has a new key length in every layer at every
    decode step. Measured on an H100 (Qwen2-VL-7B dims, 8K prompt, VL-Cache's per-layer lengths): about 1.2 s
    per token with cuDNN in play against 30 ms without; flash / memory-efficient attention have no per-shape
    setup. The prompt itself (one shape per request) keeps PyTorch's own choice."""
    if not query.is_cuda:
        return contextlib.nullcontext()
    return sdpa_kernel(_DECODE_BACKENDS)


_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Session:
    """One policy attached to one model. Use through `vlcache.compress(...)` or `vlcache.attach(...)`."""

    def __init__(self, model, policy: Policy, processor=None, compile: bool = False):
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a vlcache Policy, got {type(policy).__name__}")
        if not isinstance(compile, bool):  # compile="no" is truthy: it would turn compiled decode on
            raise ValueError(f"compile must be True or False, got {compile!r}")
        self.model = model
        self.policy = policy
        self.family = family_for(model.config, processor)  # raises for unsupported families, before touching anything
        check_reductions(model, policy)
        if policy.quantizes:  # a group size that does not divide the head dim fails here, not mid-generate
            cfg = text_config(model)
            QuantConfig.of(policy, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        if policy.lookahead_draft:  # refused here rather than inside the first generate
            check_draftable(CompressedCache(model.config))
        self.cache: CompressedCache | None = None  # the cache of the forward in flight
        self.prefill_stats: CompressionStats | None = None
        # what the last prefill left, for `prefill_rows` and `prefill_positions`: only the apps read those, so they
        # are worked out when read, from the cache and its slot positions as the prefill left them
        self._prefilled: tuple[CompressedCache, dict[int, torch.Tensor]] | None = None
        self._rows: list[CompressionStats] | None = None
        self._positions: dict[int, torch.Tensor] | None = None
        self.stats: CompressionStats | None = None  # at the end of the last generate
        self.last_cache: CompressedCache | None = None
        self._request_inputs: dict = {}  # the tensors of the generate call in flight
        self._handles = []
        self._modules = []
        self._original_impl = None
        self._attached = False
        self.runner = PolicyRunner(policy, text_config(model).num_attention_heads)
        self.decode = CompiledDecode(model, policy, self.runner) if compile else None  # compiled decode steps

    # ------------------------------------------------------------------ lifecycle

    def attach(self) -> Session:
        if self._attached:
            return self
        if getattr(self.model, "_vlcache_session", None) is not None:
            raise RuntimeError("this model is already inside vlcache.compress(); detach that session first")
        warn_if_untested()
        warn_if_hub_kernels(self.model)
        register()
        self._original_impl, impl = vlcache_implementation(self.model)
        self._modules = attention_modules(self.model)
        set_text_implementation(self.model, impl)
        for m in self._modules:
            m._vlcache_session = self
        self._handles = [
            self.model.register_forward_pre_hook(self._before, with_kwargs=True),
            self.model.register_forward_hook(self._after, with_kwargs=True),
        ]
        if self.policy.temporal_merge is not None:
            self._handles.append(decoder(self.model).register_forward_pre_hook(self._merge, with_kwargs=True))
        if self.policy.prune_at is not None:
            for i, layer in enumerate(decoder(self.model).layers):
                if i > self.policy.prune_at:
                    hook = partial(self._cut, i)
                    self._handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        if self.decode is not None:
            self.decode.attach()
        self._generate, self._previous = wrap_generate(self.model, self.generate)  # image reuse may wrap too
        self.model._vlcache_session = self
        self._attached = True
        return self

    def detach(self) -> None:
        if not self._attached:
            return
        for h in self._handles:
            h.remove()
        for m in self._modules:
            m.__dict__.pop("_vlcache_session", None)
        set_text_implementation(self.model, self._original_impl)
        if self.decode is not None:
            self.decode.detach()
        self._attached = False  # from here a call that still reaches `generate` passes through (`unwrap_generate`)
        unwrap_generate(self.model, self._previous, self.generate)
        self.model.__dict__.pop("_vlcache_session", None)
        self.model._vlcache_stats = self.stats or self.prefill_stats
        self.cache = None
        self._attached = False

    def __enter__(self) -> Session:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def new_cache(self) -> CompressedCache:
        """An empty cache for this model (pass it to generate to continue a conversation later)."""
        return CompressedCache(self.model.config)

    # ------------------------------------------------------------------ generate

    def generate(self, *args, **kwargs):
        # Calls from several threads take turns: the hooks keep the forward in flight in `self.cache`, so two
        # interleaved generates would compress each other's caches. setdefault on the instance dict is atomic,
        # so the first callers agree on one lock. Parallel requests need one model (and session) each.
        if not self._attached:  # detached while another wrapper still calls it: nothing of this session applies
            return self._generate(*args, **kwargs)
        with self.__dict__.setdefault("_generate_lock", threading.RLock()):
            return self._generate_one(*args, **kwargs)

    def _generate_one(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if ids is not None and ids.shape[-1] == 0:
            raise ValueError("empty prompt: input_ids has no tokens")
        gc = kwargs.get("generation_config") or self.model.generation_config
        if kwargs.get("use_cache", getattr(gc, "use_cache", True)) is False:
            # without a cache every step recomputes the whole sequence: there is nothing to compress, and the
            # session's cache would take each step's whole sequence again
            raise ValueError("use_cache=False has no KV cache to compress: generate it outside vlcache.compress")
        cache = pop_cache(kwargs)  # either name, whatever the installed transformers calls it
        if cache is None:
            cache = self.new_cache()
        elif not isinstance(cache, CompressedCache):
            raise ValueError(f"inside vlcache.compress, pass {CACHE_KWARG}=session.new_cache() (or no cache at all)")
        kwargs[CACHE_KWARG] = cache
        if kwargs.get("prefill_chunk_size") or getattr(gc, "prefill_chunk_size", None):
            raise ValueError(
                "vlcache compresses after one prefill; chunked prefill (prefill_chunk_size) is not supported"
            )
        # what the caller gave generate, for the prompt's layout: from transformers 5.24 on, generate encodes the
        # images itself and hands the forward only their features, without the sizes that tell frames apart
        self._request_inputs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        # what a frozen layer leaves room for: an overestimate only costs capacity, an underestimate a rebuild of
        # the frozen cache mid-generate
        cache.decode_room = new_tokens(kwargs, gc, ids)
        try:
            out = self._generate(*args, **kwargs)
        finally:
            self._request_inputs = {}
            cache.decode_room = None
            if self.decode is not None:
                self.decode.flush(cache)
            thaw(cache)  # the dynamic layers back, for stats and a chat's next turn
        if cache.layout is None or not cache.prefilled:
            raise RuntimeError(
                "vlcache never saw this generate's prompt forward, so nothing was compressed: "
                f"{tested_note()}. The cache probably reached the model under a name or path vlcache does not "
                "know; see vlcache/hf/compat.py"
            )
        self.last_cache = cache
        self.stats = cache.stats(self.label())
        self.model._vlcache_stats = self.stats
        return out

    @property
    def prefill_rows(self) -> list[CompressionStats]:
        """`prefill_stats` of each batch row (the captioner's per-video records), worked out on first read."""
        if self._rows is None:
            if self._prefilled is None:
                return []
            cache, positions = self._prefilled
            B = cache.layout.batch_size
            total = self.prefill_stats
            self._rows = [cache.row_stats(total, positions, b) for b in range(B)] if B > 1 else [total]
        return self._rows

    @property
    def prefill_positions(self) -> dict[int, torch.Tensor]:
        """layer -> [B, Hk, K] positions in the prompt as given of the entries each layer kept after the prefill,
        on the CPU (the demo's pictures of kept patches), worked out on first read."""
        if self._positions is None:
            if self._prefilled is None:
                return {}
            cache, positions = self._prefilled
            self._positions = {i: cache.original_positions(p).detach().cpu() for i, p in positions.items()}
        return self._positions

    def label(self) -> str:
        """The policy's name, its budgets and every other setting that differs from its default (so that two runs
        of one method with different settings are told apart in stats and outputs)."""
        p = self.policy
        amounts = {
            k: v
            for k, v in (("budget", p.budget), ("vision", p.vision_budget), ("text", p.text_budget))
            if v is not None
        }
        amounts.update(p.changed_settings())
        return p.name + (f"({', '.join(f'{k}={v}' for k, v in amounts.items())})" if amounts else "")

    # ------------------------------------------------------------------ hooks

    def _before(self, module, args, kwargs):
        cache = get_cache(kwargs)
        if not isinstance(cache, CompressedCache):
            self.cache = None
            return
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        B, q = ref.shape[0], ref.shape[1]
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        if not cache.prefilled and cache.layout is not None:  # spliced by image reuse, which gave the layout
            if self.policy.prune_at is not None or self.policy.temporal_merge is not None:
                self.cache = None
                raise ValueError(
                    "image reuse recomputes only part of the prompt, so prune_at and temporal_merge cannot apply: "
                    "drop them from the policy, or generate without vlcache.reuse"
                )
        elif not cache.prefilled:
            if ids is None:
                raise ValueError("vlcache needs input_ids on the prompt's forward to tell vision tokens from text")
            given = {k: v for k, v in kwargs.items() if v is not None}
            inputs = {**self._request_inputs, **given, "attention_mask": mask}
            layout = layout_from_inputs(self.model.config, inputs, family=self.family)
            cache.begin(layout, mask if mask is not None else torch.ones(B, q, dtype=torch.bool, device=ids.device))
        else:
            valid = mask[:, -q:] if mask is not None else torch.ones(B, q, dtype=torch.bool, device=ref.device)
            cache.extend(valid)
        self.cache = cache

    def _after(self, module, args, kwargs, output):
        cache = self.cache
        if cache is not None and cache.draft is not None:  # a draft forward (lookahead_draft): nothing to record
            self.cache = None
            return
        if cache is not None and not cache.prefilled:
            unseen = [i for i in cache.compressible() if i not in cache.attended]
            if unseen:
                self.cache = None
                raise RuntimeError(
                    f"vlcache's attention was not called in decoder layers {unseen} during the prompt, so they "
                    f"cannot be compressed: {tested_note()}. transformers may have changed how it dispatches "
                    "attention; see vlcache/hf/compat.py"
                )
            self.runner.finish_prefill(cache)
            if self.policy.lookahead_draft:  # draft the first tokens, then cut every layer (hf/draft.py)
                run_draft(self, cache, output, kwargs)
                cache.shared["_lookahead_recorded"] = True
            self._record_prefill(cache)
        elif cache is not None and self.policy.lookahead and not cache.shared.get("_lookahead_recorded"):
            if not any(self.runner.looking(cache, i) for i in cache.compressible()):
                cache.shared["_lookahead_recorded"] = True
                self._record_prefill(cache)  # what the lookahead cut kept is the prompt's compression, for stats
        self.cache = None

    def _record_prefill(self, cache) -> None:
        """Stats of the compressed prompt (after the prefill, or after a lookahead's cut); per-row stats and kept
        positions are worked out from it when read."""
        self.prefill_stats = cache.stats(self.label())
        self._prefilled, self._rows, self._positions = (cache, cache.kept_positions()), None, None

    def _merge(self, module, args, kwargs):
        out = merge_inputs(self.cache, self.policy, kwargs)
        return None if out is None else (args, out)

    def _cut(self, layer_idx, module, args, kwargs):
        return cut_layer_inputs(self.cache, layer_idx, args, kwargs)

    # ------------------------------------------------------------------ per layer (called by the attention wrapper)

    def attend(self, module, query, key, value, mask, stock, eager: bool, **kwargs):
        cache = self.cache
        li = module.layer_idx
        layer = cache.layers[li]
        if isinstance(layer, StaticLayer):  # a compiled decode step: no policy work, no host sync
            return attend_static(layer, module, query, stock, eager, **kwargs)
        if not isinstance(layer, CompressibleLayer):
            return stock(module, query, key, value, mask, **kwargs)
        if cache.draft is not None:
            return cache.draft.attend(self, module, query, key, value, stock, eager, **kwargs)
        if self.runner.looking(cache, li):
            self.runner.before_attention(cache, li, query, kwargs.get("scaling"))
            layer = cache.layers[li]  # compacted in place, or quantized and then cut
            if layer.compacted and not isinstance(layer, QuantizedLayer):
                key, value = layer.dense()
        if isinstance(layer, QuantizedLayer):
            # the stock functions would need the whole layer in full precision: attend over the codes instead
            scaling = kwargs.get("scaling")
            out = layer.attend(query, scaling if scaling is not None else query.shape[-1] ** -0.5)
            self.runner.layer_forward(cache, li, query, scaling)
            return out.transpose(1, 2).contiguous(), None
        q = query.shape[2]
        if layer.compacted or cache.hidden:
            # slots are not the prompt's positions 0..T-1 (compacted, or the sequence was shortened before the
            # model), so transformers' mask does not fit: build the layer's own.
            # one new row over unpadded slots needs no mask: skip building one on every decode step
            needs = q > 1 or cache.padded or layer.has_dead
            mask = layer_mask(cache.slot_valid(layer), q, query.shape[1], query.dtype, eager) if needs else None
        if not cache.prefilled:
            cache.attended.add(li)
            cache.note_peak()  # this layer holds its whole prompt now, before its cut
        with _decode_backends(query) if cache.prefilled else contextlib.nullcontext():
            out = stock(module, query, key, value, mask, **kwargs)
        self.runner.layer_forward(cache, li, query, kwargs.get("scaling"))
        return out
