"""The kvpress side of `vlcache bench peer`, run with kvpress's own virtualenv (it pins transformers < 5.3).

    .venv-kvpress/bin/python vlcache/apps/bench/peer_worker.py DIR

DIR holds setup.json (the Llama config, the runs and their presses), weights.safetensors and prompt.safetensors
written by the vlcache side; this writes DIR/kvpress.json. It imports nothing from vlcache but two torch-only
modules (the shared greedy loop and the position matching), loaded by path.
"""

import importlib.metadata
import importlib.util
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM


def _local(name: str):
    """A torch-only module of this folder, loaded by path (importing vlcache would need its transformers)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


greedy = _local("greedy").greedy
positions = _local("positions")


def make_press(spec: dict):
    """The press a run names: `press` + `args`, and with `decoding` the same scorer run by kvpress's DecodingPress
    after every `interval` generated tokens down to `target_size`, behind PrefillDecodingPress."""
    import kvpress

    press = getattr(kvpress, spec["press"])(**spec["args"])
    d = spec.get("decoding")
    if d is None:
        return press
    scorer = getattr(kvpress, d["press"])(**d["args"])
    decoding = kvpress.DecodingPress(
        base_press=scorer, compression_interval=d["interval"], target_size=d["target_size"]
    )
    return kvpress.PrefillDecodingPress(prefilling_press=press, decoding_press=decoding)


def run(model, ids, spec, new_tokens, prompt_keys):
    """One greedy run: a prefill press compresses the prefill only (kvpress's intended use); a decoding press wraps
    the whole loop. Kept positions are recovered after prefill and at the end."""
    press = make_press(spec) if spec is not None else None
    decoding = spec is not None and spec.get("decoding") is not None
    look = (lambda cache: positions.cache_positions(cache, prompt_keys)) if prompt_keys is not None else None
    cache = DynamicCache()
    with press(model) if decoding else nullcontext():
        prefill = press(model) if press is not None and not decoding else None
        r = greedy(model, ids, cache, new_tokens, prefill, on_prefill=look)
    r["at_end"] = positions.cache_positions(cache, prompt_keys) if prompt_keys is not None else None
    return r, cache


def best_of(model, ids, spec, new_tokens, prompt_keys, repeat):
    """The first run's tokens and positions, the fastest of `repeat` runs' times."""
    first, cache = run(model, ids, spec, new_tokens, prompt_keys)
    for _ in range(repeat - 1):
        again, _ = run(model, ids, spec, new_tokens, None)
        if again["tokens"] != first["tokens"]:
            raise RuntimeError(f"{spec} generated other tokens on a second run")
        first["prefill_s"] = min(first["prefill_s"], again["prefill_s"])
        first["decode_ms"] = min(first["decode_ms"], again["decode_ms"])
    return first, cache


def main(folder: str) -> int:
    d = Path(folder)
    setup = json.loads((d / "setup.json").read_text())
    torch.set_num_threads(setup["threads"])
    weights = load_file(d / "weights.safetensors")
    ids = load_file(d / "prompt.safetensors")["input_ids"]
    n, new, repeat = ids.shape[1], setup["new_tokens"], setup["repeat"]
    models = {}
    for attn in sorted({r["attn"] for r in setup["runs"]}):
        models[attn] = LlamaForCausalLM(LlamaConfig(**setup["config"], attn_implementation=attn)).eval()
        models[attn].load_state_dict(weights)
    results = {"version": importlib.metadata.version("kvpress"), "runs": {}}
    prompt_keys = {}
    for attn, model in models.items():  # warm-up, then each attention's full cache (what positions are matched to)
        greedy(model, ids[:, : min(n, 256)], DynamicCache(), 2)
        r, cache = best_of(model, ids, None, new, None, repeat)
        prompt_keys[attn] = [layer.keys[:, :, :n].clone() for layer in cache.layers]
        results["runs"][f"full-{attn}"] = r
    for spec in setup["runs"]:
        model = models[spec["attn"]]
        r, _ = best_of(model, ids, spec, new, prompt_keys[spec["attn"]], repeat)
        results["runs"][spec["name"]] = r
    (d / "kvpress.json").write_text(json.dumps(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
