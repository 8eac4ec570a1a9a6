"""The kvpress side of `vlcache bench peer`, run with kvpress's own virtualenv (it pins transformers < 5.3).

    .venv-kvpress/bin/python vlcache/bench/peer_worker.py DIR

DIR holds dims.json, weights.safetensors and prompt.safetensors written by the vlcache side; this writes
DIR/kvpress.json. It imports nothing from vlcache but two torch-only modules (the memory probe and the shared
greedy loop), loaded by path.
"""

import importlib.metadata
import importlib.util
import json
import sys
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


memprobe = _local("memprobe")
greedy = _local("greedy").greedy


def decode(model, ids, press, new_tokens):
    """Prefill (compressed by `press`), then the shared greedy loop."""
    return greedy(model, ids, DynamicCache(), new_tokens, press(model) if press is not None else None)


def main(folder: str) -> int:
    from kvpress import SnapKVPress

    d = Path(folder)
    setup = json.loads((d / "dims.json").read_text())
    torch.set_num_threads(setup["threads"])
    model = LlamaForCausalLM(LlamaConfig(**setup["config"])).eval()
    model.load_state_dict(load_file(d / "weights.safetensors"))
    ids = load_file(d / "prompt.safetensors")["input_ids"]
    press = SnapKVPress(compression_ratio=1 - setup["keep"], window_size=setup["window"], kernel_size=setup["kernel"])
    decode(model, ids[:, :256], None, 2)  # warm-up
    results = {"version": importlib.metadata.version("kvpress")}
    for name, p in (("full", None), ("snapkv", press)):
        r = decode(model, ids, p, setup["new_tokens"])
        with memprobe.PeakTensorMemory() as probe:
            decode(model, ids, p, setup["new_tokens"])
        r["peak_bytes"] = probe.peak
        results[name] = r
    (d / "kvpress.json").write_text(json.dumps(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
