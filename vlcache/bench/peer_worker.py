"""The kvpress side of `vlcache bench peer`, run with kvpress's own virtualenv (it pins transformers < 5.3).

    .venv-kvpress/bin/python vlcache/bench/peer_worker.py DIR

DIR holds dims.json, weights.safetensors and prompt.safetensors written by the vlcache side; this writes
DIR/kvpress.json. It imports nothing from vlcache but the torch-only memory probe, loaded by path.
"""

import importlib.metadata
import importlib.util
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

_spec = importlib.util.spec_from_file_location("memprobe", Path(__file__).with_name("memprobe.py"))
memprobe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memprobe)


def decode(model, ids, press, new_tokens):
    """Prefill (compressed by `press`), then greedy steps with explicit positions. Returns timings and tokens."""
    cache = DynamicCache()
    n = ids.shape[1]
    with torch.inference_mode():
        t0 = time.perf_counter()
        with press(model) if press is not None else nullcontext():
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        t1 = time.perf_counter()
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [int(tok)]
        for s in range(new_tokens - 1):
            out = model(input_ids=tok, past_key_values=cache, position_ids=torch.tensor([[n + s]]), use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(tok))
        t2 = time.perf_counter()
    kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return dict(prefill_s=t1 - t0, decode_ms=1000 * (t2 - t1) / max(1, new_tokens - 1), kv_bytes=kv, tokens=tokens)


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
