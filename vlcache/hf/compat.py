"""Every transformers name vlcache relies on that is private or changed between releases, and nothing else.

When a transformers release breaks vlcache, the break is here: `tests/test_compat.py` checks each entry of
`NAMES` against the installed version, so a name that disappears is one test failure naming it.

Version differences, oldest first (the tested range is `TESTED`):

- 5.17: `Idefics3ImageProcessorPil` / `SmolVLMImageProcessorPil` must come from their own modules (the top-level
  lazy module wrongly asks for torchvision); `LlavaOnevisionModel.get_video_features` takes `pixel_values=`.
- 5.23: `get_video_features` takes `pixel_values_videos=`; a `DummyLayer` cache layer type appears; positive
  `crop()` raises; `DynamicLayer.reset()` drops its tensors.
- 5.24: the cache argument of every `forward`, of `generate` and of `create_causal_mask` is renamed
  `past_key_values` -> `cache` (the old name still works, with a FutureWarning, until 5.40 / 6.0), and model
  outputs carry it as `.cache`; `DynamicLayer.lazy_initialization` no longer sets `layer.dtype`.
- 5.25: `from_pretrained` swaps layers' forwards for hub kernels unless told `use_kernels=False` (before, off
  unless asked); that needs the `kernels` package (0.19.1 <= version < 0.20) and the hub at load time, so every
  load goes through `from_pretrained` here, which turns it off (a user's own load with them on, on a GPU, gets one
  warning from `warn_if_hub_kernels`).

Everything else in vlcache uses transformers' public API only (`AutoModel*`, configs, `DynamicCache`, `generate`).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings
from contextlib import contextmanager

import transformers
from packaging.version import Version

TESTED = ("5.17.0", "5.25.0")  # the oldest and the newest release the whole test suite ran on
INSTALLED = Version(transformers.__version__)


class MissingName:
    """Stands in for a transformers name the installed release lacks: importing vlcache still works (and the
    compatibility test names the gap), using the name raises one clear error."""

    def __init__(self, path: str, why: str):
        self.path, self.why = path, why

    def error(self) -> ImportError:
        return ImportError(
            f"vlcache needs transformers' {self.path}, which transformers {transformers.__version__} does not have "
            f"({self.why}); vlcache is tested with transformers {TESTED[0]} to {TESTED[1]}"
        )

    def __call__(self, *args, **kwargs):
        raise self.error()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise self.error()


def _resolve(path: str):
    """'module:attr.attr' -> the object, or a MissingName."""
    module, _, attrs = path.partition(":")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        return MissingName(path, f"import failed: {e}")
    for attr in attrs.split(".") if attrs else ():
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            return MissingName(path, f"no attribute {attr!r}")
    return obj


# Every module-level name vlcache takes from transformers internals. Values are resolved once, at import.
NAMES = {
    "AttentionInterface": "transformers:AttentionInterface",
    "AttentionMaskInterface": "transformers.masking_utils:AttentionMaskInterface",
    "sdpa_mask": "transformers.masking_utils:sdpa_mask",
    "eager_mask": "transformers.masking_utils:eager_mask",
    "sdpa_attention_forward": "transformers.integrations.sdpa_attention:sdpa_attention_forward",
    "llama_eager_attention": "transformers.models.llama.modeling_llama:eager_attention_forward",
    "DynamicCache": "transformers:DynamicCache",
    "DynamicLayer": "transformers.cache_utils:DynamicLayer",
    "lazy_initialization": "transformers.cache_utils:DynamicLayer.lazy_initialization",
    "LlamaModel_forward": "transformers:LlamaModel.forward",
    "get_rope_index": "transformers:Qwen2VLModel.get_rope_index",
    "is_progress_bar_enabled": "transformers.utils.logging:is_progress_bar_enabled",
    "disable_progress_bar": "transformers.utils.logging:disable_progress_bar",
    "enable_progress_bar": "transformers.utils.logging:enable_progress_bar",
    "Idefics3ImageProcessorPil": "transformers.models.idefics3.image_processing_pil_idefics3:Idefics3ImageProcessorPil",
    "SmolVLMImageProcessorPil": "transformers.models.smolvlm.image_processing_pil_smolvlm:SmolVLMImageProcessorPil",
}
_resolved = {name: _resolve(path) for name, path in NAMES.items()}

AttentionInterface = _resolved["AttentionInterface"]
AttentionMaskInterface = _resolved["AttentionMaskInterface"]
sdpa_mask = _resolved["sdpa_mask"]
eager_mask = _resolved["eager_mask"]
sdpa_attention_forward = _resolved["sdpa_attention_forward"]
Idefics3ImageProcessorPil = _resolved["Idefics3ImageProcessorPil"]
SmolVLMImageProcessorPil = _resolved["SmolVLMImageProcessorPil"]

# Instance attributes and behaviours the test checks on a live cache (they are not module-level names).
CACHE_ATTRIBUTES = (
    "DynamicCache(config).layers",  # one layer object per decoder layer
    "DynamicCache().layer_class_to_replicate",  # the class a config-less cache builds its layers from
    "DynamicLayer.keys / .values / .is_initialized",
    "Qwen2VLModel.rope_deltas",  # generate's M-RoPE offset for the tokens after the prompt
    "DynamicSlidingWindowLayer.sliding_window / .cumulative_length",  # compiled decode freezes and restores it
)


def require(*names: str):
    """The named entries, for classes vlcache subclasses at import: a missing one raises its clear error now
    (a subclass of a stand-in would fail with a confusing TypeError instead)."""
    objs = [_resolved[name] for name in names]
    for obj in objs:
        if isinstance(obj, MissingName):
            raise obj.error()
    return objs if len(objs) > 1 else objs[0]


def missing() -> dict[str, str]:
    """name -> why, for every entry of NAMES the installed transformers lacks."""
    return {name: obj.why for name, obj in _resolved.items() if isinstance(obj, MissingName)}


# ------------------------------------------------------------------ the cache argument (renamed in 5.24)


def _cache_argument() -> str:
    forward = _resolved["LlamaModel_forward"]
    if isinstance(forward, MissingName):
        return "past_key_values"
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


CACHE_KWARG = _cache_argument()  # what `forward` and `generate` of the installed release call the cache
_CACHE_NAMES = ("cache", "past_key_values")


def get_cache(kwargs: dict):
    """The cache in a forward's or generate's keyword arguments, under either name."""
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def pop_cache(kwargs: dict):
    """Remove the cache from keyword arguments (under either name) and return it; both names at once is an error."""
    given = [name for name in _CACHE_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError("pass the cache once: got both cache= and past_key_values=")
    values = [kwargs.pop(name, None) for name in _CACHE_NAMES]
    return next((v for v in values if v is not None), None)


def cache_kwargs(cache) -> dict:
    """{name: cache} under the name the installed release takes (no FutureWarning from vlcache's own calls)."""
    return {CACHE_KWARG: cache}


def output_cache(output):
    """The cache a model output carries (`.cache` from 5.24, `.past_key_values` before)."""
    for name in _CACHE_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None


# ------------------------------------------------------------------ cache layers


def init_layer(layer, keys, values) -> None:
    """Give an empty `DynamicLayer` its device (and, before 5.24, dtype) from the first tensors it will hold."""
    layer.lazy_initialization(keys, values)


def sliding_state(layer) -> tuple[int, int] | None:
    """(window, tokens seen) of a stock sliding-window layer, or None for any other layer."""
    window = getattr(layer, "sliding_window", None)
    if not isinstance(window, int) or not hasattr(layer, "cumulative_length"):
        return None
    return window, layer.cumulative_length


def restore_sliding(layer, keys, values, seen: int) -> None:
    """Make a stock sliding-window layer hold `keys` / `values` (its last window - 1 tokens) after `seen` tokens."""
    layer.keys, layer.values = keys.contiguous(), values.contiguous()
    layer.cumulative_length = seen


def replicate_layers_as(cache, layer_class) -> None:
    """Make a config-less cache build its layers from `layer_class` on first update."""
    cache.layer_class_to_replicate = layer_class


# ------------------------------------------------------------------ attention and configs


def eager_attention_of(module):
    """The eager attention of the module's own modeling file (some add softcapping or sinks to Llama's)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return fn if fn is not None else _resolved["llama_eager_attention"]


def attn_implementation(config) -> str | None:
    """The attention implementation a (sub)config selects."""
    return config._attn_implementation


def set_text_attention(model, name: str) -> None:
    """Select an attention implementation for the language model only (vision towers keep theirs)."""
    if "text_config" in getattr(model.config, "sub_configs", {}):
        model.set_attn_implementation({"text_config": name})
    else:
        model.set_attn_implementation(name)


# ------------------------------------------------------------------ M-RoPE (Qwen2-VL, Qwen2.5-VL)


def get_rope_index(model, input_ids, *, image_grid_thw=None, attention_mask=None, mm_token_type_ids=None):
    """(M-RoPE position ids [3, B, n], rope deltas [B, 1]) of a Qwen-VL prompt."""
    return model.model.get_rope_index(
        input_ids,
        image_grid_thw=image_grid_thw,
        video_grid_thw=None,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_token_type_ids,
    )


def set_rope_deltas(model, deltas) -> None:
    """Tell a Qwen-VL model the offset generate adds to text positions after a prompt it did not prefill itself."""
    model.model.rope_deltas = deltas


# ------------------------------------------------------------------ loading

# Options every checkpoint load takes. Hub kernels (on by default from 5.25) fetch code from the hub when the model
# loads, which an offline machine cannot do, and replace layers' forwards that vlcache's attention path and compiled
# decode are written and tested against. `use_kernels` is accepted, and False by default, from 5.17 to 5.24.
LOAD_OPTIONS = {"use_kernels": False}


def from_pretrained(model_class, path, **kwargs):
    """`model_class.from_pretrained(path, **kwargs)` with `LOAD_OPTIONS` beneath kwargs (a caller's own
    `use_kernels=True` wins)."""
    return model_class.from_pretrained(path, **{**LOAD_OPTIONS, **kwargs})


def warn_if_hub_kernels(model) -> None:
    """One warning when `model` was loaded with hub kernels on an accelerator (5.25's default for a plain
    `from_pretrained`; transformers' kernel table has no CPU entries, so on the CPU nothing was swapped): its
    norms, activations and rotary embedding then run code from the hub that vlcache was not tested with."""
    if not getattr(model, "use_kernels", False) or getattr(model, "_vlcache_kernels_warned", False):
        return
    if _device_type(model) == "cpu":
        return
    model._vlcache_kernels_warned = True
    warnings.warn(
        "this model was loaded with hub kernels (transformers 5.25's default); vlcache is tested without them: "
        "load it with use_kernels=False, as vlcache.hf.compat.from_pretrained(cls, path) does",
        stacklevel=4,
    )


def _device_type(model) -> str:
    return next(model.parameters()).device.type


# ------------------------------------------------------------------ logging, versions


@contextmanager
def quiet_progress():
    """Hide transformers' own progress bars for the block (a tiny model loads at once; its bar is noise)."""
    enabled = _resolved["is_progress_bar_enabled"]()
    _resolved["disable_progress_bar"]()
    try:
        yield
    finally:
        if enabled:
            _resolved["enable_progress_bar"]()


_warned = False


def tested_note() -> str:
    return f"transformers {transformers.__version__} (vlcache is tested with {TESTED[0]} to {TESTED[1]})"


def warn_if_untested() -> None:
    """One warning per process when the installed transformers is newer than the newest tested (not an error:
    most releases change nothing vlcache uses, and a break shows as an error naming the version)."""
    global _warned
    if _warned or INSTALLED.release[:2] <= Version(TESTED[1]).release[:2]:
        return
    _warned = True
    warnings.warn(
        f"vlcache has not been tested with {tested_note()}; if compression fails or does nothing, "
        "install a tested release (pip install 'transformers<=" + TESTED[1] + "') and report the break",
        stacklevel=3,
    )
