"""Peer comparison: NVIDIA's kvpress SnapKVPress against vlcache's SnapKV on the same text-only model and prompt.

    python3 -m venv .venv-kvpress && .venv-kvpress/bin/pip install torch==2.13.0 kvpress safetensors
    vlcache bench peer                 # prompt of 4096 tokens, keep 10%, window 32, kernel 5

kvpress pins transformers below 5.3, so it runs in its own virtualenv (`--kvpress-python`) as a worker process;
both sides load the same saved weights (a config-built Llama, random weights) and prompt, prefill with
compression, then decode greedily with the same manual loop (explicit positions). Reported per library: prefill
time, decode ms per token, KV bytes, peak tensor memory, and agreement of the generated tokens with that library's
own full-cache run, plus whether the two full-cache runs agree with each other.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import save_file

import vlcache

from ..hf.compat import CACHE_KWARG
from ..policies import SnapKV
from . import first_paragraph
from .greedy import greedy
from .memprobe import PeakTensorMemory

DIMS = dict(
    vocab_size=256,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    bos_token_id=1,
    eos_token_id=2,
)


def decode(model, ids, policy, new_tokens):
    with vlcache.compress(model, policy) if policy is not None else nullcontext() as session:
        cache = session.new_cache() if session else T.DynamicCache(config=model.config)
        return greedy(model, ids, cache, new_tokens, cache_kwarg=CACHE_KWARG)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vlcache bench peer", description=first_paragraph(__doc__))
    p.add_argument("--kvpress-python", default=".venv-kvpress/bin/python")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--keep", type=float, default=0.1)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--kernel", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default="out/peer")
    args = p.parse_args(argv)
    if not Path(args.kvpress_python).exists():
        raise FileNotFoundError(
            f"{args.kvpress_python} not found: install kvpress in its own virtualenv first (see --help)"
        )
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**DIMS)).eval()
    ids = torch.randint(4, 104, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    work = Path(tempfile.mkdtemp(prefix="vlcache-peer-"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, work / "weights.safetensors")
    save_file({"input_ids": ids}, work / "prompt.safetensors")
    setup = dict(
        config=DIMS,
        keep=args.keep,
        window=args.window,
        kernel=args.kernel,
        new_tokens=args.new_tokens,
        threads=torch.get_num_threads(),
    )
    (work / "dims.json").write_text(json.dumps(setup))

    worker = Path(__file__).with_name("peer_worker.py")
    proc = subprocess.run([args.kvpress_python, str(worker), str(work)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the kvpress worker failed:\n{proc.stderr[-2000:]}")
    theirs = json.loads((work / "kvpress.json").read_text())

    policy = SnapKV(budget=args.keep, window=args.window, kernel=args.kernel, protect=())
    decode(model, ids[:, :256], None, 2)  # warm-up
    ours = {}
    for name, pol in (("full", None), ("snapkv", policy)):
        r = decode(model, ids, pol, args.new_tokens)
        with PeakTensorMemory() as probe:
            decode(model, ids, pol, args.new_tokens)
        r["peak_bytes"] = probe.peak
        ours[name] = r

    print(f"text-only Llama {DIMS['num_hidden_layers']}x{DIMS['hidden_size']} (random weights), prompt {args.tokens} tokens, keep {args.keep}, "
          f"window {args.window}, kernel {args.kernel}, {args.new_tokens} new tokens; CPU, {torch.get_num_threads()} threads")  # fmt: skip
    header = f"{'library':<16} {'run':<7} {'prefill s':>10} {'x full':>7} {'decode ms/t':>12} {'x full':>7} {'KV MiB':>8} {'peak MiB':>9} {'agree':>6}"
    print(header)
    print("-" * len(header))
    rows = []
    for lib, res in ((f"vlcache {vlcache.__version__}", ours), (f"kvpress {theirs.get('version', '?')}", theirs)):
        full = res["full"]
        for name in ("full", "snapkv"):
            r = res[name]
            agree = sum(a == b for a, b in zip(r["tokens"], full["tokens"])) / len(full["tokens"])
            row = dict(library=lib, run=name, prefill_s=r["prefill_s"], prefill_ratio=r["prefill_s"] / full["prefill_s"],
                       decode_ms=r["decode_ms"], decode_ratio=r["decode_ms"] / full["decode_ms"], kv_bytes=r["kv_bytes"],
                       peak_bytes=r["peak_bytes"], agreement=agree)  # fmt: skip
            rows.append(row)
            print(
                f"{lib:<16} {name:<7} {row['prefill_s']:>10.3f} {row['prefill_ratio']:>7.2f} {row['decode_ms']:>12.2f} "
                f"{row['decode_ratio']:>7.2f} {row['kv_bytes'] / 2**20:>8.1f} {row['peak_bytes'] / 2**20:>9.1f} {agree:>6.2f}"
            )
    same_full = ours["full"]["tokens"] == theirs["full"]["tokens"]
    print(f"the two full-cache runs agree token for token: {same_full}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer.json").write_text(
        json.dumps({"setup": setup, "rows": rows, "full_runs_agree": same_full}, indent=2) + "\n"
    )
    print(f"wrote {out / 'peer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
