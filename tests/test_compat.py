"""The transformers compatibility contract: every internal name vlcache uses exists in the installed release, the
cache argument goes by the installed release's name, and a release that breaks vlcache fails loudly."""

import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T

import vlcache
from vlcache import testing
from vlcache.hf import compat
from vlcache.policies import Full, SnapKV

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(compat.NAMES))
def test_every_internal_name_exists_in_the_installed_transformers(name):
    obj = compat._resolved[name]
    assert not isinstance(obj, compat.MissingName), (
        f"transformers {T.__version__} lacks {compat.NAMES[name]} ({obj.why}): update vlcache/hf/compat.py"
    )


def test_the_cache_layer_internals_vlcache_relies_on():
    cfg = testing.models.text_kwargs(layers=2, hidden=16, heads=2, kv_heads=1)
    config = T.LlamaConfig(**cfg)
    cache = compat.require("DynamicCache")(config=config)
    assert len(cache.layers) == 2, "DynamicCache(config=...) must build one layer per decoder layer"
    assert compat.require("DynamicCache")().layer_class_to_replicate is not None
    layer = compat.require("DynamicLayer")()
    assert not layer.is_initialized
    k = torch.randn(1, 1, 3, 8)
    compat.init_layer(layer, k, k)
    assert layer.is_initialized and layer.keys.device == k.device
    layer.update(k, k)
    assert layer.keys.shape == (1, 1, 3, 8) and layer.values.shape == (1, 1, 3, 8)


def test_the_sliding_window_layer_internals_compiled_decode_relies_on():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    layer = DynamicSlidingWindowLayer(sliding_window=4)
    k = torch.randn(1, 1, 6, 8)
    layer.update(k, k)
    assert compat.sliding_state(layer) == (4, 6), "sliding_window / cumulative_length moved: update compat.py"
    compat.restore_sliding(layer, k[:, :, -3:], k[:, :, -3:], 7)
    assert layer.get_seq_length() == 7 and torch.equal(layer.keys, k[:, :, -3:])
    out, _ = layer.update(k[:, :, :1], k[:, :, :1])
    assert out.shape[2] == 4  # the restored window plus the new token, as the stock layer attends
    assert compat.sliding_state(compat.require("DynamicLayer")()) is None


def test_qwen_keeps_rope_deltas_on_its_inner_model(tiny_model):
    model = tiny_model("qwen2_vl")
    assert hasattr(model.model, "rope_deltas"), "generate's M-RoPE offset moved: update compat.set_rope_deltas"


def test_the_cache_argument_name_is_the_installed_releases():
    model = T.LlamaForCausalLM(T.LlamaConfig(**testing.models.text_kwargs(layers=1, hidden=16, heads=2, kv_heads=1)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated name would warn
        out = model(
            input_ids=torch.tensor([[1, 2, 3]]), use_cache=True, **compat.cache_kwargs(compat.require("DynamicCache")())
        )
    assert compat.output_cache(out).get_seq_length() == 3


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_generate_takes_either_cache_name_without_warning(tiny_model, name):
    """Under vlcache the user's cache may come under either name; vlcache passes it on under the installed
    release's, so neither vlcache nor transformers warns, and the given cache is the one filled."""
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, ["ab", testing.IMAGE, "what?"]).inputs
    plain = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with vlcache.compress(model, Full()) as session:
        cache = session.new_cache()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, **{name: cache})
    assert torch.equal(out, plain)
    assert session.last_cache is cache and cache.prefilled and cache.get_seq_length() > 0


def test_both_cache_names_at_once_is_an_error(tiny_model):
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, ["ab", testing.IMAGE, "what?"]).inputs
    with vlcache.compress(model, Full()) as session:
        with pytest.raises(ValueError, match="both cache= and past_key_values="):
            model.generate(**inputs, cache=session.new_cache(), past_key_values=session.new_cache(), max_new_tokens=1)


def test_a_prompt_vlcache_never_saw_is_an_error_naming_the_version(tiny_model, monkeypatch):
    """If a transformers release hands the cache to forward in a way vlcache does not find, generate must not
    return uncompressed output: it raises, naming the installed and the tested versions."""
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, ["ab", testing.IMAGE, "what?"]).inputs
    monkeypatch.setattr("vlcache.hf.session.get_cache", lambda kwargs: None)
    with vlcache.compress(model, SnapKV(budget=0.5)):
        with pytest.raises(RuntimeError, match=re.escape(f"transformers {T.__version__}") + ".*" + compat.TESTED[1]):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)


def test_attention_that_bypasses_vlcache_is_an_error(tiny_model, monkeypatch):
    """If the model stops dispatching attention through the registered function, the layers cannot be compressed:
    the prompt's forward raises instead of leaving them whole."""
    model = tiny_model("llava")
    inputs = testing.make_inputs(model, ["ab", testing.IMAGE, "what?"]).inputs
    monkeypatch.setattr("vlcache.hf.session.set_text_implementation", lambda model, name: None)
    with vlcache.compress(model, SnapKV(budget=0.5)):
        with pytest.raises(RuntimeError, match=r"attention was not called in decoder layers \[0, 1\]"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert compat.attn_implementation(model.config.get_text_config()) == "sdpa"


def test_a_newer_transformers_warns_once_at_attach(tiny_model, monkeypatch):
    from packaging.version import Version

    model = tiny_model("llava")
    monkeypatch.setattr(compat, "INSTALLED", Version("99.1.0"))
    monkeypatch.setattr(compat, "_warned", False)
    with pytest.warns(UserWarning, match=f"not been tested with transformers .*{compat.TESTED[1]}"):
        vlcache.attach(model, Full()).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vlcache.attach(model, Full()).detach()  # once per process


def test_the_tested_range_is_declared_everywhere():
    lower = re.search(r'"transformers>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert compat.TESTED[0].startswith(lower), "pyproject's lower bound must be the oldest tested release"
    readme = (ROOT / "README.md").read_text()
    assert f"transformers {compat.TESTED[0]} to {compat.TESTED[1]}" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"transformers=={compat.TESTED[0]}" in ci
    torch_floor = re.search(r'"torch>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    oldest_venv = re.search(r"\.venv-oldest/bin/pip install -q torch==([\d.]+)", ci)
    assert oldest_venv and oldest_venv.group(1).startswith(torch_floor), "CI's oldest venv must run the torch floor"
    assert f"torch {torch_floor} to" in readme


def test_a_missing_name_fails_with_one_clear_error():
    gone = compat._resolve("transformers.masking_utils:no_such_function")
    assert isinstance(gone, compat.MissingName)
    with pytest.raises(ImportError, match=f"transformers {re.escape(T.__version__)} does not have.*no_such_function"):
        gone(1, 2)
    with pytest.raises(ImportError, match="tested with transformers"):
        gone.anything  # noqa: B018  (an attribute of a missing class fails the same way)


# Private or renamed transformers names that belong in compat.py only.
INTERNALS = re.compile(
    r"from transformers\.|import transformers\.|past_key_values\s*=|\.rope_deltas\b|\.get_rope_index\(|lazy_initialization"
    r"|layer_class_to_replicate|\._attn_implementation|transformers\.utils|T\.utils"
)


def test_transformers_internals_are_reached_through_compat_only():
    offenders = []
    for folder in ("vlcache", "scripts", "demo", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name in ("compat.py", "peer_worker.py"):  # peer_worker runs in kvpress's own transformers 5.2
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if INTERNALS.search(code) and '"""' not in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "use vlcache/hf/compat.py for these:\n" + "\n".join(offenders)


def test_policies_modality_kernels_import_without_transformers():
    """The torch-only parts of the library must not pull in transformers (the package root is lazy)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'transformers' or name.startswith('transformers.'):\n"
        "            raise ImportError('transformers is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import vlcache, vlcache.policies, vlcache.modality, vlcache.kernels, vlcache.compression_stats\n"
        "from vlcache.policies import make_policy, POLICIES\n"
        "make_policy('snapkv', budget=0.1)\n"
        "assert vlcache.Policy is vlcache.policies.Policy\n"
        "assert 'transformers' not in sys.modules\n"
        "try:\n"
        "    vlcache.compress\n"
        "except ImportError as e:\n"
        "    assert 'blocked' in str(e)\n"
        "else:\n"
        "    raise SystemExit('vlcache.compress imported although transformers is blocked')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_package_root_exports_what_it_lists():
    assert sorted(vlcache.__all__) == sorted(vlcache._EXPORTS)
    for name in vlcache.__all__:
        assert getattr(vlcache, name) is not None
    importlib.import_module("vlcache.reuse")  # the subpackage of the same name must not hide the function
    assert callable(vlcache.reuse) and vlcache.reuse.__module__ == "vlcache.api"


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "qwen2_vl", "qwen3_vl", "idefics3"])
def test_the_layout_inside_generate_is_the_layout_of_the_inputs(tiny_model, family):
    """From transformers 5.24, generate encodes images before the forward and drops pixel sizes and grids from the
    forward's arguments; the layout vlcache builds must still tell every frame and image apart."""
    from util import prompt_for

    from vlcache.modality import layout_from_inputs

    model = tiny_model(family)
    inputs = testing.make_inputs(model, prompt_for(family)).inputs
    with vlcache.compress(model, Full()) as session:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert session.last_cache.layout.samples == layout_from_inputs(model.config, inputs).samples


def test_every_checkpoint_load_turns_hub_kernels_off(tmp_path, monkeypatch):
    """From 5.25 `from_pretrained` fetches hub kernels unless told not to (it needs the `kernels` package and the
    hub, and swaps the layers' forwards vlcache hooks): the apps' loads of the embedded model and of a local
    checkpoint both pass use_kernels=False, and the model they return has kernels off."""
    from vlcache.apps import model_loading

    seen = []
    original = T.PreTrainedModel.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        seen.append(kwargs.get("use_kernels"))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(T.PreTrainedModel, "from_pretrained", classmethod(spy))
    model, _ = model_loading.load("embedded", device="cpu")
    assert seen == [False] and not model.use_kernels

    testing.build("llava").save_pretrained(tmp_path / "ckpt")
    testing.processor("llava").save_pretrained(tmp_path / "ckpt")
    model, _ = model_loading.load(str(tmp_path / "ckpt"), device="cpu")
    assert seen[1:] and all(s is False for s in seen) and not model.use_kernels


def test_a_model_with_hub_kernels_on_an_accelerator_is_warned_about_once(monkeypatch):
    """A user's own `from_pretrained` on 5.25 turns hub kernels on; on a GPU they replace norms, activations and
    the rotary embedding with hub code vlcache is not tested with: one warning, naming the way out. On the CPU
    transformers swaps nothing (its kernel table has no CPU entries), so nothing is said there."""
    model = testing.build("llava")
    monkeypatch.setattr(type(model), "use_kernels", property(lambda self: True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with vlcache.compress(model, Full()):  # on the CPU: silent
            pass
    monkeypatch.setattr(compat, "_device_type", lambda m: "cuda")
    with pytest.warns(UserWarning, match="loaded with hub kernels.*use_kernels=False") as record:
        for _ in range(2):
            with vlcache.compress(model, Full()):
                pass
    assert sum("hub kernels" in str(w.message) for w in record) == 1
    monkeypatch.setattr(type(model), "use_kernels", property(lambda self: False))
    other = testing.build("llava")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with vlcache.compress(other, Full()):  # kernels off: silent on a GPU too
            pass
