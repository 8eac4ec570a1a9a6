"""Position-independent image KV reuse (EPIC, Hu et al., arXiv 2410.15332), for Hugging Face VLMs.

Every image of a prompt is a chunk: its token span, markers included. A chunk is compiled once, the image alone at
position 0, and stored (`ImageKVStore`). A later prompt containing that image, anywhere, links instead of
prefilling it: the stored keys are rotated to the image's new position, spliced into the cache with the stored
values, and only a recompute set R runs through the model, attending to everything before it:

- "first_k" (EPIC's AttnLink, default k = 16): the first k tokens of every reused image, and every other token;
- "cacheblend" (CacheBlend-style): layers 0 and 1 recomputed for every token; then the reused tokens whose layer-1
  values deviate most from the cached ones (top `ratio`), and every other token;
- "full": every token (the exact baseline, for checking).

Images not in the store are compiled and stored, then recomputed whole. The linked cache is an ordinary vlcache
cache: `generate` continues from it, and a compression policy attached with `vlcache.compress` applies to the
prompt as in a cold prefill, scored from the recomputed rows (which always include the text after the images).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import torch

from ..fingerprint import weights_digest
from ..modality import family_for, layout_from_inputs
from ..modality.families import UnsupportedModelError
from ..reuse.rope import rerotate
from ..reuse.store import Chunk, ImageKVStore, chunk_key
from .cache import CompressedCache, CompressibleLayer, DynamicCache
from .compat import cache_kwargs, get_rope_index, pop_cache, set_rope_deltas
from .model_parts import current_implementation, decoder, new_tokens, unwrap_generate, wrap_generate

REUSE_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
RECOMPUTE = ("first_k", "cacheblend", "full")
QWEN = ("qwen2_vl", "qwen2_5_vl")
MODEL_INPUTS = (
    "input_ids",
    "attention_mask",
    "pixel_values",
    "image_sizes",
    "image_grid_thw",
    "mm_token_type_ids",
    "batch_num_images",
)


class ImageReuse:
    """Reuse of image KV across requests on one model. Use through `vlcache.reuse(model, store, ...)`."""

    def __init__(
        self,
        model,
        store: ImageKVStore,
        *,
        recompute: str = "first_k",
        k: int = 16,
        ratio: float = 0.15,
        processor=None,
    ):
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.family = family_for(model.config, processor)
        if self.family.name not in REUSE_FAMILIES:
            raise UnsupportedModelError(
                f"image reuse supports {', '.join(REUSE_FAMILIES)}; this model is {self.family.name!r}"
            )
        self.model, self.store, self.recompute, self.k, self.ratio = model, store, recompute, k, ratio
        self.lm = decoder(model)
        self.inv_freq = self.lm.rotary_emb.inv_freq
        settings = (
            processor.image_processor.to_dict()
            if processor is not None and hasattr(processor, "image_processor")
            else {}
        )
        # the weights themselves, not their path: a model retrained and saved over the old checkpoint must not be
        # handed the old one's KV (the same path, config and dtype say nothing about what the weights are)
        self.identity = [
            weights_digest(model),
            model.config.to_json_string(),
            str(model.dtype),
            settings,
        ]
        self.last: dict = {}
        self._previous = None
        self._attached = False

    # ------------------------------------------------------------------ lifecycle: wraps model.generate

    def attach(self) -> ImageReuse:
        if not self._attached:
            self._generate, self._previous = wrap_generate(self.model, self.generate)
            self._attached = True
        return self

    def detach(self) -> None:
        if self._attached:
            self._attached = False  # a call that still reaches `generate` passes through (`unwrap_generate`)
            unwrap_generate(self.model, self._previous, self.generate)

    # ------------------------------------------------------------------ generate

    def generate(self, *args, **kwargs):
        if not self._attached:  # detached while another wrapper still calls it
            return self._generate(*args, **kwargs)
        # calls from several threads take turns: the recompute forward's hooks and the rope state are per model
        with self.__dict__.setdefault("_generate_lock", threading.RLock()):
            return self._generate_one(*args, **kwargs)

    def _generate_one(self, *args, **kwargs):
        inputs = {k: kwargs.pop(k) for k in MODEL_INPUTS if k in kwargs}
        if args:
            inputs["input_ids"] = args[0]
        ids = inputs.get("input_ids")
        if ids is None:
            raise ValueError("image reuse needs input_ids")
        if ids.shape[0] != 1 or (inputs.get("attention_mask") is not None and not bool(inputs["attention_mask"].all())):
            raise ValueError("image reuse links one prompt at a time: batch size 1, no padding")
        layout = layout_from_inputs(self.model.config, inputs, family=self.family)
        given = pop_cache(kwargs)  # e.g. from a compression session wrapped around this one
        if given is not None and given.get_seq_length() > 0:
            return self._generate(**inputs, **cache_kwargs(given), **kwargs)  # a later chat turn: nothing to link
        if not layout.samples[0].images:
            return self._generate(**inputs, **(cache_kwargs(given) if given is not None else {}), **kwargs)
        gc = kwargs.get("generation_config") or self.model.generation_config
        self._check_linkable(layout, kwargs, gc)
        with torch.inference_mode():
            cache, logits = self.link(inputs, layout, cache=given)
        eos = kwargs.get("eos_token_id", gc.eos_token_id)
        eos = list(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        if eos and kwargs.get("min_new_tokens", gc.min_new_tokens):  # as generate does: no end before the minimum
            logits = logits.clone()
            logits[..., eos] = float("-inf")
        first = logits.argmax(-1, keepdim=True)  # greedy, like the generate call it replaces
        max_new = new_tokens(kwargs, gc, ids)
        for name in ("max_new_tokens", "max_length"):  # the later tokens' length is passed below
            kwargs.pop(name, None)
        ids = torch.cat([ids, first.to(ids.device)], dim=1)
        if max_new <= 1 or int(first) in eos:  # generate would stop here too
            return ids
        nxt = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if "mm_token_type_ids" in inputs:
            mm = inputs["mm_token_type_ids"]
            nxt["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(mm[:, :1])], dim=1)
        if "min_new_tokens" in kwargs:
            kwargs["min_new_tokens"] = max(0, kwargs["min_new_tokens"] - 1)
        return self._generate(**nxt, **cache_kwargs(cache), max_new_tokens=max_new - 1, **kwargs)

    # options that act on the first generated token, which linking picks itself (greedily, from the recompute
    # forward's logits): refused rather than applied to the later tokens only
    FIRST_TOKEN_OPTIONS = ("streamer", "output_scores", "output_logits", "return_dict_in_generate", "output_attentions")

    def _check_linkable(self, layout, kwargs: dict, gc) -> None:
        if layout.samples[0].videos or "pixel_values_videos" in kwargs:
            raise ValueError(
                "image reuse links images only; this prompt has a video: generate it outside vlcache.reuse"
            )
        session = getattr(self.model, "_vlcache_session", None)
        if session is not None and getattr(session.policy, "lookahead_draft", False):
            raise ValueError("lookahead_draft drafts from the prompt's own forward, which image reuse skips: drop one")
        for name, off in (("do_sample", False), ("num_beams", 1), ("num_return_sequences", 1)):
            value = kwargs.get(name, getattr(gc, name, None))
            if value is not None and value != off:
                raise ValueError(f"image reuse picks the first token greedily: {name}={value!r} is not supported")
        for name in self.FIRST_TOKEN_OPTIONS:
            if kwargs.get(name):
                raise ValueError(f"image reuse picks the first token itself: {name} is not supported with it")

    # ------------------------------------------------------------------ linking

    @torch.no_grad()  # a cache for inference: the recompute forward writes into the spliced KV in place
    def link(
        self, inputs: dict, layout=None, cache: CompressedCache | None = None
    ) -> tuple[CompressedCache, torch.Tensor]:
        """Build the cache of a prompt from stored images plus a recompute forward; returns (cache, the last
        prompt token's logits [1, vocab])."""
        t0 = time.perf_counter()
        model = self.model
        ids = inputs["input_ids"]
        n = ids.shape[1]
        layout = layout or layout_from_inputs(model.config, inputs, family=self.family)
        positions, text_pos = self._positions(inputs)
        chunks = self._chunks(inputs, layout)
        if not chunks:
            raise ValueError("this prompt has no images to link: call generate, which prefills it as usual")
        t_compiled = time.perf_counter()

        embeds = model.get_input_embeddings()(ids)  # text tokens; image tokens come from the chunks
        # every layer's KV in one [layers, 1, Hk, n, d] tensor, filled a whole image at a time: one re-rotation and
        # two copies per image rather than per image and layer (at 28 layers the per-layer loop was ~8 ms of kernel
        # launches per image on an H100, more than the recompute forward itself)
        keys_all = values_all = None
        recompute = torch.ones(n, dtype=torch.bool, device=ids.device)
        starts = text_pos[[start for start, _, _, _ in chunks]].tolist()  # one device sync, not one per image
        for (start, end, chunk, new), pos in zip(chunks, starts):
            embeds[0, start:end] = chunk.embeds.to(embeds.device, embeds.dtype)
            k = torch.stack(chunk.keys).to(embeds.device)  # [layers, Hk, t, d]
            v = torch.stack(chunk.values).to(embeds.device)
            if keys_all is None:
                keys_all = embeds.new_zeros(k.shape[0], 1, k.shape[1], n, k.shape[-1])
                values_all = embeds.new_zeros(v.shape[0], 1, v.shape[1], n, v.shape[-1])
            keys_all[:, 0, :, start:end] = rerotate(k, int(pos) - chunk.base, self.inv_freq)
            values_all[:, 0, :, start:end] = v
            if not new:
                keep = (
                    0
                    if self.recompute == "full"
                    else (end - start)
                    if self.recompute == "cacheblend"
                    else min(self.k, end - start)
                )
                recompute[start + keep : end] = self.recompute == "full"
        keys = [keys_all[i] for i in range(len(keys_all))]  # per-layer views, no copy (unbind's views could not be
        values = [values_all[i] for i in range(len(values_all))]  # written in place by the recompute forward)
        if self.recompute == "cacheblend":
            recompute = self._blend(embeds, positions, keys, values, recompute, chunks)
        rows = recompute.nonzero().flatten()

        session = getattr(model, "_vlcache_session", None)
        if cache is None:
            cache = session.new_cache() if session is not None else CompressedCache(model.config)
        elif not isinstance(cache, CompressedCache):
            raise ValueError("image reuse links into a vlcache cache: pass none, or session.new_cache()")
        cache.begin(layout, torch.ones(1, n, dtype=torch.bool, device=ids.device))
        for li, layer in enumerate(cache.layers):
            if not isinstance(layer, CompressibleLayer):
                raise UnsupportedModelError("image reuse needs full-attention layers only")
            layer.splice(keys[li], values[li])
            layer.fill_at = rows
        cache.query_positions = rows[None]
        mask = (torch.arange(n, device=ids.device)[None, :] <= rows[:, None])[None, None]  # causal, rows = R
        if current_implementation(model).endswith("eager"):
            mask = torch.zeros(mask.shape, dtype=embeds.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(embeds.dtype).min
            )
        try:
            out = model(
                inputs_embeds=embeds[:, rows],
                position_ids=positions[..., rows],
                attention_mask=mask,
                **cache_kwargs(cache),
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            for layer in cache.layers:
                layer.fill_at = None
            cache.query_positions = None
        if session is None:
            cache.prefilled = True  # with a session, its forward hook has done it (and compressed)
        if self.family.name in QWEN:
            set_rope_deltas(model, self._rope_deltas)  # generate continues from positions of the whole prompt
        t_end = time.perf_counter()
        reused = [c for c in chunks if not c[3]]
        self.last = {
            "images": len(chunks),
            "reused": len(reused),
            "compiled": len(chunks) - len(reused),
            "tokens": n,
            "reused_tokens": sum(end - start for start, end, _, _ in reused),
            "recomputed": int(rows.numel()),
            "compile_s": t_compiled - t0,
            "link_s": t_end - t_compiled,
        }
        return cache, out.logits[:, -1]

    def _positions(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(position ids for the model: [1, n] or M-RoPE [3, 1, n]; the text position of every token [n])."""
        ids = inputs["input_ids"]
        if self.family.name in QWEN:
            pos, deltas = get_rope_index(
                self.model,
                ids,
                image_grid_thw=inputs.get("image_grid_thw"),
                attention_mask=inputs.get("attention_mask"),
                mm_token_type_ids=inputs.get("mm_token_type_ids"),
            )
            self._rope_deltas = deltas
            return pos, pos[0, 0]
        pos = torch.arange(ids.shape[1], device=ids.device)
        return pos[None], pos

    def _chunks(self, inputs, layout) -> list[tuple[int, int, Chunk, bool]]:
        """(start, end, chunk, newly compiled) of every image, markers included, in prompt order."""
        ids = inputs["input_ids"][0]
        marker = layout.marker[0]
        out = []
        for i, spans in enumerate(layout.samples[0].images):
            start, end = spans[0].start, spans[-1].end
            if start > 0 and bool(marker[start - 1]):
                start -= 1
            if end < len(ids) and bool(marker[end]):
                end += 1
            image_inputs = self._image_inputs(inputs, i)
            token_ids = ids[start:end]
            key = chunk_key(
                torch.cat([v.reshape(-1).float() for v in image_inputs.values()]), *self.identity, token_ids.tolist()
            )
            chunk = self.store.get(key)
            new = chunk is None
            if new:
                chunk = self.compile(key, token_ids, image_inputs)
                self.store.put(chunk)
            out.append((start, end, chunk, new))
        return out

    def _image_inputs(self, inputs, i: int) -> dict:
        """The model inputs of image i alone."""
        pv = inputs["pixel_values"]
        if self.family.name in QWEN:
            thw = inputs["image_grid_thw"]
            sizes = thw.prod(-1).tolist()
            off = sum(sizes[:i])
            return {"pixel_values": pv[off : off + sizes[i]], "image_grid_thw": thw[i : i + 1]}
        out = {"pixel_values": pv[i : i + 1]}
        if inputs.get("image_sizes") is not None:
            out["image_sizes"] = inputs["image_sizes"][i : i + 1]
        if inputs.get("batch_num_images") is not None:
            out["batch_num_images"] = torch.ones(1, dtype=inputs["batch_num_images"].dtype)
        return out

    @torch.inference_mode()
    def compile(self, key: str, token_ids: torch.Tensor, image_inputs: dict) -> Chunk:
        """Prefill one image's tokens alone, from position 0; keep its per-layer KV and input embeddings."""
        captured = {}

        def grab(module, args, kwargs):
            captured["embeds"] = kwargs.get("inputs_embeds")

        ids = token_ids[None]
        extra = {"mm_token_type_ids": (ids == self.family.image_token).int()} if self.family.name in QWEN else {}
        cache = DynamicCache(config=self.model.config)
        handle = self.lm.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **cache_kwargs(cache),
                use_cache=True,
                logits_to_keep=1,
                **image_inputs,
                **extra,
            )
        finally:
            handle.remove()
        return Chunk(
            key,
            [layer.keys[0].detach().clone() for layer in cache.layers],
            [layer.values[0].detach().clone() for layer in cache.layers],
            captured["embeds"][0].detach().clone(),
            base=0,
        )

    def _blend(self, embeds, positions, keys, values, recompute, chunks) -> torch.Tensor:
        """CacheBlend-style selection: fresh layers 0 and 1 for every token, then the reused tokens whose layer-1
        values deviate most from the cached ones."""
        fresh = DynamicCache(config=self.model.config)
        with self._first_layers(2):
            self.lm(inputs_embeds=embeds, position_ids=positions, **cache_kwargs(fresh), use_cache=True)
        deviation = (
            ((fresh.layers[1].values - values[1].to(fresh.layers[1].values.dtype)) ** 2).float().sum((0, 1, 3))
        )  # [n]
        for li in (0, 1):
            keys[li], values[li] = fresh.layers[li].keys, fresh.layers[li].values
        reused = torch.zeros_like(recompute)
        for start, end, _, new in chunks:
            if not new:
                reused[start:end] = True
        chosen = recompute & ~reused
        count = int(reused.sum().item() * self.ratio)
        if count:
            top = deviation.masked_fill(~reused, float("-inf")).topk(count).indices
            chosen[top] = True
        chosen[-1] = True  # the last token gives the first output token
        return chosen

    @contextmanager
    def _first_layers(self, count: int):
        """Run only the first `count` decoder layers (CacheBlend's check pass)."""
        layers, config = self.lm.layers, self.lm.config
        total = config.num_hidden_layers
        self.lm.layers = torch.nn.ModuleList(list(layers)[:count])
        config.num_hidden_layers = count
        try:
            yield
        finally:
            self.lm.layers = layers
            config.num_hidden_layers = total
