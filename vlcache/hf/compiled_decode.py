"""Compiled decode (`vlcache.compress(model, policy, compile=True)`): the language model's decode steps run as one
`torch.compile`d forward over a frozen, static-capacity cache (static_cache.py).

The language model's `forward` is wrapped for the session: the prompt and anything that is not a one-token step
of a prefilled cache inside `generate` run as usual; at the first decode step the cache is frozen, and every step
runs the compiled forward (mode "reduce-overhead", i.e. CUDA graphs, on CUDA; the default mode elsewhere). The
vision tower, the embeddings, the LM head and generate's own work stay eager: they are a handful of launches.

A policy that acts while decoding (H2O, StreamingLLM, CAKE, Elastic Cache: `on_append`) runs eagerly between
steps, every `evict_every` steps (counted on from the policy's own count at each freeze: a chat's next turn starts
where its last left off): the compiled step appends, attends and keeps its query rows; then each of those
steps' `on_append` is replayed in order over the cache as it stood at that step (the same calls, on the same
tensors, as uncompiled decoding makes), so the result is the eager one. A policy with `decode_mass = True` is
called once instead, with the k rows and the attention mass the compiled step summed for it
(`layer.state["decode_mass"]`, [B, Hk, T]: each slot's attention summed over the k steps' rows and averaged over
each KV head's query heads; `"decode_mass_last"`: the last step's alone), so it needs no second attention pass.
"""

from __future__ import annotations

import torch

from ..policies import Policy
from .cache import CompressedCache
from .compat import INSTALLED, get_cache
from .model_parts import decoder, text_config
from .static_cache import StaticLayer, freeze, full, thaw

OLDEST = "5.17.0"  # compiled decode is tested from here on (the oldest release vlcache supports)
# dynamo compiles at most `recompile_limit` (8) variants of one code object and then runs it eagerly, silently; every
# model's forward goes through the same transformers decorator, so models, policies with and without decode mass,
# and sliding-window layers all count against one limit: raised (never lowered) once compiled decode is used
RECOMPILE_LIMIT = 64
# each generate freezes into new buffers, so CUDA graph trees record again at new static addresses; before torch 2.12
# those re-recordings count against a limit (128) past which CUDA graphs are skipped: a captioner's 129th video
RERECORD_LIMIT = 1 << 20


def compile_mode(device: torch.device) -> str | None:
    return "reduce-overhead" if device.type == "cuda" else None


class CompiledDecode:
    """The compiled decode of one session's model."""

    def __init__(self, model, policy: Policy, runner):
        if INSTALLED.release < (5, 17):
            raise ValueError(f"compile=True needs transformers >= {OLDEST}, found {INSTALLED}")
        if policy.quantizes:
            raise ValueError("compile=True does not support quantized caches (vision_bits / text_bits)")
        if policy.lookahead and runner.appends:
            raise ValueError("compile=True does not support lookahead together with eviction while decoding")
        self.model, self.policy, self.runner = model, policy, runner
        self.decoder = decoder(model)
        self.heads = text_config(model).num_attention_heads
        self.every = getattr(policy, "evict_every", 1) if runner.appends else 0
        self.mass = bool(getattr(policy, "decode_mass", False)) and runner.appends
        self._eager = None
        self._compiled = None
        self.capture = True  # False runs the frozen steps uncompiled (tests, debugging: same cache, no compile time)
        self.steps = 0  # frozen steps run

    def attach(self) -> None:
        self._eager = self.decoder.forward
        self.decoder.forward = self.forward

    def detach(self) -> None:
        self.decoder.__dict__.pop("forward", None)

    def compiled(self, device: torch.device):
        if not self.capture:
            return self._eager
        if self._compiled is None:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
            triton_config = torch._inductor.config.triton
            triton_config.cudagraph_unexpected_rerecord_limit = max(
                triton_config.cudagraph_unexpected_rerecord_limit, RERECORD_LIMIT
            )
            # dynamic=None: the buffers' capacity dims are marked dynamic at freeze (static_cache.freeze); the rest
            # stays static until it changes
            self._compiled = torch.compile(self._eager, mode=compile_mode(device))
        return self._compiled

    def forward(self, *args, **kwargs):
        cache = get_cache(kwargs)
        if args or not self._steps(cache, kwargs):
            return self._eager(*args, **kwargs)
        if cache.static is not None and full(cache):  # generate went on past the room it asked for: grow
            self.flush(cache)  # the steps since the last eviction go through the policy before the rebuild
            thaw(cache)
        if cache.static is None:
            managed = self.managed(cache)
            freeze(cache, cache.decode_room, self.heads, self.every, self.mass, managed)
            if self.every and managed:  # in step with the policy's own count, left by a chat's turn or a rebuild
                state = cache.layers[min(managed)].inner.state
                cache.static.due = self.every - self.policy.appended_since_eviction(state)
        kwargs["attention_mask"] = cache.static.mask  # 4-D: transformers builds no mask, vlcache masks each layer
        if kwargs.get("position_ids") is None:
            ref = kwargs.get("inputs_embeds")
            ref = ref if ref is not None else kwargs["input_ids"]
            kwargs["position_ids"] = torch.full((ref.shape[0], 1), cache.get_seq_length(), device=ref.device)
        out = self.compiled(cache.static.mask.device)(**kwargs)
        self.steps += 1
        for layer in cache.layers:
            layer.advance()
        if cache.static.due:
            cache.static.pending += 1
            if cache.static.pending >= cache.static.due:
                self.evict(cache)
        return out

    def managed(self, cache: CompressedCache) -> set[int]:
        """The compressible layers the policy evicts in while decoding: all, or those up to `prune_at` (the layers
        after it hold what it passed on and are left to themselves), less those it can no longer evict from (a hold
        of the vision alone, which decoding never adds to: the graph then runs on without stopping for them)."""
        layers = cache.compressible()
        return {
            li
            for li in layers
            if (self.runner.prune_at is None or li <= self.runner.prune_at)
            and self.policy.evicts_in(cache.layers[li].state)
        }

    def flush(self, cache: CompressedCache) -> None:
        """At the end of generate: the steps since the last eviction go through the policy too (they are not due to
        evict, but their scores count, as they do decoding uncompiled), so the thawed cache is the eager one."""
        if cache.static is not None and cache.static.pending:
            self.evict(cache)

    def _steps(self, cache, kwargs) -> bool:
        """Whether this forward is a decode step the compiled forward takes: one new token of a prefilled cache,
        inside generate (which told the cache how many tokens are still to come)."""
        if not isinstance(cache, CompressedCache) or not cache.prefilled or cache.decode_room is None:
            return False
        ref = kwargs.get("inputs_embeds")
        ref = ref if ref is not None else kwargs.get("input_ids")
        if ref is None or ref.shape[1] != 1:
            return False
        if cache.static is None and self.runner.lookahead:
            return not any(self.runner.looking(cache, i) for i in cache.compressible())
        return True

    def evict(self, cache: CompressedCache) -> None:
        """The policy's `on_append` of the steps since the last call, eagerly (see the module docstring)."""
        k, cache.static.pending, cache.static.due = cache.static.pending, 0, self.every
        for li, layer in enumerate(cache.layers):
            if not isinstance(layer, StaticLayer) or layer.rows is None:  # a layer the policy does not evict in
                continue
            cache.layers[li] = layer.inner  # the policy and `apply` see an ordinary layer
            try:
                if self.mass:
                    self._once(cache, li, layer, k)
                else:
                    self._replay(cache, li, layer, k)
                layer.refreeze(cache)
            finally:
                cache.layers[li] = layer
            layer.row.zero_()

    def _replay(self, cache, li: int, layer: StaticLayer, k: int) -> None:
        end = layer.filled
        for r in range(k):
            inner = layer.settle(end - k + r + 1)
            view = self.runner.view(cache, li, layer.rows[:, :, r : r + 1], inner.state.get("_scale"))
            with torch.no_grad():
                sels = self.policy.on_append(view)
            if sels and r < k - 1:
                raise RuntimeError(
                    f"{self.policy.name} evicted {k - 1 - r} steps before its evict_every={self.every} was due; "
                    "compiled decode cannot replay that"
                )
            self.runner.apply(cache, sels)

    def _once(self, cache, li: int, layer: StaticLayer, k: int) -> None:
        inner = layer.settle()
        T = layer.filled
        inner.state["decode_mass"] = layer.mass[..., :T].clone()
        inner.state["decode_mass_last"] = layer.mass_last[..., :T].clone()
        view = self.runner.view(cache, li, layer.rows[:, :, :k], inner.state.get("_scale"))
        try:
            with torch.no_grad():
                sels = self.policy.on_append(view)
        finally:
            inner.state.pop("decode_mass", None)
            inner.state.pop("decode_mass_last", None)
        self.runner.apply(cache, sels)
        layer.mass.zero_()
