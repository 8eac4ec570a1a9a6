"""Peer comparison: vlcache's SnapKV, StreamingLLM, H2O and PyramidKV against NVIDIA kvpress's presses for the same
methods, on the same text model, weights and prompt, with matched settings: which prompt positions each library
keeps, per layer and KV head, besides token agreement, speed and cache size.

    python3 -m venv .venv-kvpress && .venv-kvpress/bin/pip install torch==2.13.0 kvpress safetensors
    vlcache bench peer                   # a config-built Llama 8 x 512, q/k weights x3, prompt of 4096 tokens
    vlcache bench peer --model embedded  # the embedded model's text tower (4 x 128, trained) as a plain Llama

kvpress pins transformers below 5.3, so it runs in its own virtualenv (`--kvpress-python`) as a worker process. Both
sides load the same saved weights and prompt, prefill with compression, then decode greedily with the same manual
loop (explicit positions). A random Llama attends almost uniformly, which leaves top-k choices to tie-breaking and
rounding: the default scales its q and k projections (`--qk-scale`), and the attention entropy of the last 32
prompt rows relative to uniform is printed so a reader sees how peaked attention is.

Kept positions are recovered from the cached keys alone (`positions.py`: post-RoPE keys are unique per position),
the same way on both sides, after prefill and after decoding. kvpress needs eager attention for
ObservedAttentionPress; each kvpress run is compared with a full-cache run under the same attention.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers as T
from safetensors.torch import load_file, save_file

import vlcache

from ...hf.compat import CACHE_KWARG
from ...policies import H2O, Policy, PyramidKV, SnapKV, StreamingLLM
from . import fill_flags, first_paragraph
from . import positions as P
from .greedy import greedy

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
EMBEDDED = Path(__file__).resolve().parents[2] / "embedded"
ENTROPY_ROWS = 32


# ----------------------------------------------------------------------------- the model


def text_tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A VLM checkpoint's language-model weights under plain `LlamaForCausalLM` names: `model.language_model.*`
    (or the older `language_model.model.*`) -> `model.*`, `lm_head.*` (or `language_model.lm_head.*`) ->
    `lm_head.*`; without an lm_head the input embeddings are tied in. Vision tower and projector are left out."""
    prefixes = {
        "model.language_model.": "model.",
        "language_model.model.": "model.",
        "language_model.lm_head.": "lm_head.",
        "lm_head.": "lm_head.",
    }
    out = {}
    for name, t in state.items():
        for old, new in prefixes.items():
            if name.startswith(old):
                out[new + name[len(old) :]] = t
                break
    if "model.embed_tokens.weight" not in out:
        raise ValueError("no language-model weights found (expected model.language_model.* or language_model.*)")
    out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])
    return out


def build_model(kind: str, qk_scale: float) -> tuple[T.LlamaForCausalLM, dict, dict]:
    """(model, its LlamaConfig arguments, its state dict): the random 8 x 512 Llama or the embedded text tower, q and
    k projections scaled by `qk_scale` (attention logits by its square)."""
    if kind == "random":
        config = dict(DIMS)
        torch.manual_seed(0)
        state = T.LlamaForCausalLM(T.LlamaConfig(**config)).state_dict()
    else:
        text = json.loads((EMBEDDED / "config.json").read_text())["text_config"]
        config = {k: v for k, v in text.items() if k not in ("model_type", "dtype", "transformers_version")}
        state = text_tower_state(load_file(EMBEDDED / "model.safetensors"))
    if qk_scale != 1.0:
        state = {
            k: v * qk_scale if k.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")) else v
            for k, v in state.items()
        }
    state = {k: v.contiguous().clone() for k, v in state.items()}  # no shared storage (safetensors refuses it)
    model = T.LlamaForCausalLM(T.LlamaConfig(**config)).eval()
    model.load_state_dict(state)
    return model, config, state


@dataclass(kw_only=True)
class EntropyProbe(Policy):
    """Keeps everything; records, per layer and query head, the attention entropy of the last `rows` prompt rows
    divided by that of uniform attention over the keys each row sees (1 = uniform, 0 = one key)."""

    rows: int = ENTROPY_ROWS
    found: dict = field(default_factory=dict, repr=False)

    name = "entropy-probe"
    needs_budget = False

    def score(self, view):
        return None

    def on_prefill(self, view):
        r = min(self.rows, view.new)
        rows = slice(view.new - r, None)
        p = view.probs(rows)  # [B, H, r, T]
        h = -(p * p.clamp_min(1e-30).log()).sum(-1)
        seen = (view.query_slots(rows) + 1).to(torch.float32).log().clamp(min=1e-9)  # [B, r]
        self.found[view.layer] = (h / seen[:, None, :]).mean(dim=(0, 2)).tolist()
        return None


# ----------------------------------------------------------------------------- the runs


@dataclass
class Run:
    """One method on both sides: vlcache's policy and the kvpress press (`press` + `args`, and `decoding` for its
    decode-time DecodingPress), `attn` the attention kvpress needs."""

    name: str
    policy: Policy
    press: str
    args: dict
    attn: str = "sdpa"
    decoding: dict | None = None
    note: str = ""

    def spec(self) -> dict:
        return dict(name=self.name, press=self.press, args=self.args, attn=self.attn, decoding=self.decoding)


def runs(n: int, keep: float, window: int, kernel: int, beta: float, new_tokens: int, sinks: int = 4) -> list[Run]:
    """The matched runs. kvpress keeps int(n * (1 - compression_ratio)) tokens and vlcache floor(keep * n): the
    ratio given to kvpress is 1 - (k + 1/2) / n so both keep the same k (a plain 1 - keep loses one token to float
    rounding whenever keep * n is whole). vlcache's decode-time methods evict every `new_tokens` steps, i.e. never
    within the run, where kvpress's press only compresses the prefill."""
    k = max(1, math.floor(keep * n))
    ratio = 1 - (k + 0.5) / n
    still = max(1, new_tokens)
    snap = dict(window=window, kernel=kernel, protect=())
    out = [
        Run("snapkv", SnapKV(budget=keep, **snap), "SnapKVPress",
            dict(compression_ratio=ratio, window_size=window, kernel_size=kernel)),
        Run("streamingllm", StreamingLLM(budget=keep, sinks=sinks, protect=(), evict_every=still), "StreamingLLMPress",
            dict(compression_ratio=ratio, n_sink=sinks), note="prefill only"),
        Run("streamingllm-decode", StreamingLLM(budget=keep, sinks=sinks, protect=()), "StreamingLLMPress",
            dict(compression_ratio=ratio, n_sink=sinks),
            decoding=dict(press="StreamingLLMPress", args=dict(n_sink=sinks), target_size=k, interval=1),
            note="held at k while decoding: kvpress DecodingPress(StreamingLLMPress, interval 1, target k)"),
        Run("h2o", H2O(budget=keep, recent=0.0, protect=(), evict_every=still), "ObservedAttentionPress",
            dict(compression_ratio=ratio), attn="eager", note="column sums, no recent window, prefill only"),
        Run("h2o-normalize", H2O(budget=keep, recent=0.0, normalize=True, protect=(), evict_every=still),
            "ObservedAttentionPress", dict(compression_ratio=ratio), attn="eager",
            note="sums / rows that see each key, no recent window, prefill only"),
        Run("pyramidkv", PyramidKV(budget=keep, beta=beta, **snap), "PyramidKVPress",
            dict(compression_ratio=1 - k / n, window_size=window, kernel_size=kernel, beta=beta)),
    ]  # fmt: skip
    # kvpress's PyramidKV falls back to SnapKV's flat budget unless its smallest layer budget k / beta reaches the
    # window: also run the steepest beta at which its pyramid applies, when that differs
    steep = k // window
    if 1 <= steep < beta:
        out.append(
            Run(f"pyramidkv-beta{steep}", PyramidKV(budget=keep, beta=float(steep), **snap), "PyramidKVPress",
                dict(compression_ratio=1 - k / n, window_size=window, kernel_size=kernel, beta=steep),
                note="the steepest beta at which kvpress's pyramid applies")
        )  # fmt: skip
    return out


def own_record_agrees(cache, found: list, n: int) -> bool:
    """Whether vlcache's own slot positions say what key matching found (generated slots as -1)."""
    for layer, heads in zip(cache.layers, found):
        record = layer.slot_positions()[0]
        if record.masked_fill(record >= n, -1).tolist() != heads:
            return False
    return True


def ours(model, ids, policy, new_tokens, prompt_keys=None, repeat=1) -> tuple[dict, object]:
    """vlcache's greedy run (`policy` None: the full cache): the fastest of `repeat` runs' times, the first run's
    tokens and, given the full cache's `prompt_keys`, its kept positions after prefill and at the end."""
    n = ids.shape[1]
    best = first_cache = None
    for i in range(repeat):
        track = i == 0 and prompt_keys is not None
        own = []

        def look(cache, own=own):
            found = P.cache_positions(cache, prompt_keys)
            own.append(policy is None or own_record_agrees(cache, found, n))
            return found

        with vlcache.compress(model, policy) if policy is not None else nullcontext() as session:
            cache = session.new_cache() if session else T.DynamicCache(config=model.config)
            r = greedy(model, ids, cache, new_tokens, cache_kwarg=CACHE_KWARG, on_prefill=look if track else None)
        if track:
            r["at_end"] = look(cache)
            r["own_record"] = all(own)
        if best is None:
            best, first_cache = r, cache
            continue
        if r["tokens"] != best["tokens"]:
            raise RuntimeError(f"{policy} generated other tokens on a second run")
        best["prefill_s"] = min(best["prefill_s"], r["prefill_s"])
        best["decode_ms"] = min(best["decode_ms"], r["decode_ms"])
    return best, first_cache


def agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def same_share(overlaps: list[list[float]]) -> float:
    cells = [o for layer in overlaps for o in layer]
    return sum(o == 1.0 for o in cells) / max(1, len(cells))


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / max(1, len(xs))


# ----------------------------------------------------------------------------- the command


# --quick: the values of the flags it was not given (what CI runs); the rest stay the user's, checked the same way
QUICK = dict(tokens=256, new_tokens=4)
DEFAULTS = dict(tokens=4096, new_tokens=32)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with --tokens, --new-tokens and --qk-scale resolved, every value checked before a model is
    built (a mistake is one line naming the flag, exit status 2)."""
    p = argparse.ArgumentParser(prog="vlcache bench peer", description=first_paragraph(__doc__))
    p.add_argument("--kvpress-python", default=".venv-kvpress/bin/python")
    p.add_argument(
        "--model",
        choices=("random", "embedded"),
        default="random",
        help="random: a config-built Llama 8 x 512 (seed 0); embedded: the embedded model's text tower",
    )
    p.add_argument(
        "--qk-scale",
        type=float,
        default=None,
        help="multiply q_proj and k_proj weights (default 3 for random, 1 for embedded)",
    )
    p.add_argument("--tokens", type=int, default=None, help="prompt length (default 4096, --quick 256)")
    p.add_argument("--keep", type=float, default=0.1, help="the share of the prompt kept, in (0, 1]")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--kernel", type=int, default=5, help="SnapKV's pooling kernel (a positive odd number)")
    p.add_argument("--beta", type=float, default=20.0, help="PyramidKV's beta (both libraries default to 20)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 32, --quick 4)")
    p.add_argument("--repeat", type=int, default=1, help="time each run this many times, keep the fastest")
    p.add_argument("--threads", type=int, default=None, help="torch threads on both sides (default: torch's own)")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes (256-token prompt, 4 new tokens) unless given: what CI runs"
    )
    p.add_argument("--out", default="out/peer")
    args = p.parse_args(argv)  # fmt: skip
    fill_flags(args, QUICK, DEFAULTS)  # an explicit flag wins over --quick
    if args.qk_scale is None:
        args.qk_scale = 3.0 if args.model == "random" else 1.0
    counts = [
        ("--tokens", args.tokens),
        ("--new-tokens", args.new_tokens),
        ("--window", args.window),
        ("--repeat", args.repeat),
    ] + ([("--threads", args.threads)] if args.threads is not None else [])
    for flag, value in counts:
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.tokens <= args.window:
        p.error(f"--tokens must exceed --window {args.window} (kvpress's SnapKV asserts it), got {args.tokens}")
    if args.kernel < 1 or args.kernel % 2 == 0:
        p.error(f"--kernel takes a positive odd number, got {args.kernel}")
    if not 0 < args.keep <= 1:  # also NaN
        p.error(f"--keep takes a share of the prompt in (0, 1], got {args.keep}")
    if not args.beta >= 1:  # also NaN
        p.error(f"--beta must be at least 1, got {args.beta}")
    if not math.isfinite(args.qk_scale):
        p.error(f"--qk-scale takes a finite number, got {args.qk_scale}")
    try:  # anything else the matched policies refuse, before a model is built
        runs(args.tokens, args.keep, args.window, args.kernel, args.beta, args.new_tokens)
    except ValueError as e:
        p.error(f"--keep {args.keep}, --window {args.window}, --kernel {args.kernel}, --beta {args.beta}: {e}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    n, new_tokens, qk_scale = args.tokens, args.new_tokens, args.qk_scale
    if not Path(args.kvpress_python).exists():
        raise FileNotFoundError(
            f"{args.kvpress_python} not found: install kvpress in its own virtualenv first (see --help)"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, config, state = build_model(args.model, qk_scale)
    vocab = config["vocab_size"]
    ids = torch.randint(4, min(104, vocab), (1, n), generator=torch.Generator().manual_seed(1))
    plan = runs(n, args.keep, args.window, args.kernel, args.beta, new_tokens)
    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="vlcache-peer-"))
    save_file(state, work / "weights.safetensors")
    save_file({"input_ids": ids}, work / "prompt.safetensors")
    setup = dict(
        model=args.model,
        config=config,
        qk_scale=qk_scale,
        tokens=n,
        keep=args.keep,
        kept=max(1, math.floor(args.keep * n)),
        window=args.window,
        kernel=args.kernel,
        beta=args.beta,
        new_tokens=new_tokens,
        repeat=args.repeat,
        threads=threads,
        load_average_at_start=os.getloadavg()[0],  # timings on a shared machine mean little when this is high
        runs=[r.spec() for r in plan],
    )
    (work / "setup.json").write_text(json.dumps(setup))

    worker = Path(__file__).with_name("peer_worker.py")
    proc = subprocess.run([args.kvpress_python, str(worker), str(work)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the kvpress worker failed:\n{proc.stderr[-3000:]}")
    theirs = json.loads((work / "kvpress.json").read_text())

    probe = EntropyProbe()
    with vlcache.compress(model, probe) as session:
        greedy(model, ids, session.new_cache(), 1, cache_kwarg=CACHE_KWARG)
    entropy = [probe.found[i] for i in sorted(probe.found)]

    greedy(model, ids[:, : min(n, 256)], T.DynamicCache(config=model.config), 2, cache_kwarg=CACHE_KWARG)  # warm-up
    full, full_cache = ours(model, ids, None, new_tokens, repeat=args.repeat)
    prompt_keys = [layer.keys[:, :, :n].clone() for layer in full_cache.layers]
    mine = {r.name: ours(model, ids, r.policy, new_tokens, prompt_keys, args.repeat)[0] for r in plan}

    setup["load_average_at_end"] = os.getloadavg()[0]
    kv_version = theirs.get("version", "?")
    shape = f"{config['num_hidden_layers']} x {config['hidden_size']}"
    what = "random weights, seed 0" if args.model == "random" else "the embedded model's trained text tower"
    print(f"Llama {shape} ({what}, q/k x{qk_scale:g}), fp32; prompt {n} tokens (random ids), keep {args.keep} "
          f"({setup['kept']} tokens), window {args.window}, kernel {args.kernel}, beta {args.beta:g}, "
          f"{new_tokens} new tokens; CPU, {threads} threads (load average {setup['load_average_at_start']:.1f} at start, "
          f"{setup['load_average_at_end']:.1f} at end); vlcache {vlcache.__version__} vs kvpress {kv_version}")  # fmt: skip
    per_layer = [mean(h) for h in entropy]
    print(f"attention entropy of the last {ENTROPY_ROWS} prompt rows / uniform: mean {mean(per_layer):.3f}, "
          f"per layer {' '.join(f'{e:.2f}' for e in per_layer)}")  # fmt: skip
    their_full = {a: theirs["runs"][f"full-{a}"] for a in ("sdpa", "eager") if f"full-{a}" in theirs["runs"]}
    full_agree = agreement(full["tokens"], their_full["sdpa"]["tokens"])
    print(f"full caches, vlcache vs kvpress: same tokens {full_agree:.2f}; prefill {full['prefill_s']:.3f} s vs "
          f"{their_full['sdpa']['prefill_s']:.3f} s, decode {full['decode_ms']:.2f} vs "
          f"{their_full['sdpa']['decode_ms']:.2f} ms/token")  # fmt: skip
    print()
    header = (f"{'method':<20} {'kvpress':<23} {'same heads':>10} {'overlap':>8} {'after dec':>9} {'kv asc':>6} "
              f"{'vl=full':>7} {'kv=full':>7} {'vl=kv':>6} {'prefill x full vl/kv':>20} {'decode x full vl/kv':>19} "
              f"{'KV MiB vl/kv':>13}")  # fmt: skip
    print(header)
    print("-" * len(header))
    rows = []
    for r in plan:
        a, b = mine[r.name], theirs["runs"][r.name]
        fa, fb = full, their_full[r.attn]
        pre = P.compare(a["at_prefill"], b["at_prefill"])
        end = P.compare(a["at_end"], b["at_end"])
        row = dict(
            method=r.name,
            policy=repr(r.policy),
            press=r.press + ("+DecodingPress" if r.decoding else ""),
            press_args=r.args,
            decoding=r.decoding,
            kvpress_attention=r.attn,
            note=r.note,
            same_heads_prefill=same_share(pre),
            overlap_prefill=mean(o for layer in pre for o in layer),
            same_heads_end=same_share(end),
            overlap_end=mean(o for layer in end for o in layer),
            overlap_per_layer_head_prefill=pre,
            overlap_per_layer_head_end=end,
            layer_budgets=dict(vlcache=P.prompt_counts(a["at_prefill"]), kvpress=P.prompt_counts(b["at_prefill"])),
            cache_ascending=dict(vlcache=P.ascending(a["at_prefill"]), kvpress=P.ascending(b["at_prefill"])),
            duplicates=dict(vlcache=P.duplicates(a["at_end"]), kvpress=P.duplicates(b["at_end"])),
            evicts_oldest_while_decoding=dict(
                vlcache=P.evicts_oldest(a["at_prefill"], a["at_end"], r.args["n_sink"]),
                kvpress=P.evicts_oldest(b["at_prefill"], b["at_end"], r.args["n_sink"]),
            )
            if r.decoding
            else None,
            vlcache_own_record_agrees=a["own_record"],
            tokens_vs_own_full=dict(vlcache=agreement(a["tokens"], fa["tokens"]), kvpress=agreement(b["tokens"], fb["tokens"])),
            tokens_vlcache_vs_kvpress=agreement(a["tokens"], b["tokens"]),
            prefill_x_full=dict(vlcache=a["prefill_s"] / fa["prefill_s"], kvpress=b["prefill_s"] / fb["prefill_s"]),
            decode_x_full=dict(vlcache=a["decode_ms"] / fa["decode_ms"], kvpress=b["decode_ms"] / fb["decode_ms"]),
            prefill_s=dict(vlcache=a["prefill_s"], kvpress=b["prefill_s"]),
            decode_ms=dict(vlcache=a["decode_ms"], kvpress=b["decode_ms"]),
            kv_bytes=dict(vlcache=a["kv_bytes"], kvpress=b["kv_bytes"]),
            tokens=dict(vlcache=a["tokens"], kvpress=b["tokens"]),
        )  # fmt: skip
        rows.append(row)
        after = f"{row['same_heads_end']:.2f}" if r.decoding else "-"
        print(f"{r.name:<20} {row['press']:<23} {row['same_heads_prefill']:>10.2f} {row['overlap_prefill']:>8.3f} "
              f"{after:>9} {row['cache_ascending']['kvpress']:>6.2f} {row['tokens_vs_own_full']['vlcache']:>7.2f} "
              f"{row['tokens_vs_own_full']['kvpress']:>7.2f} {row['tokens_vlcache_vs_kvpress']:>6.2f} "
              f"{row['prefill_x_full']['vlcache']:>10.2f} / {row['prefill_x_full']['kvpress']:<7.2f} "
              f"{row['decode_x_full']['vlcache']:>9.2f} / {row['decode_x_full']['kvpress']:<7.2f} "
              f"{a['kv_bytes'] / 2**20:>6.2f} / {b['kv_bytes'] / 2**20:<5.2f}")  # fmt: skip
    print()
    print("per layer, KV heads' overlap of kept prompt positions (|A & B| / |A | B|; '=' identical), after prefill:")
    layers = len(entropy)
    print(f"{'method':<20} " + " ".join(f"{'L' + str(i):<11}" for i in range(layers)))
    for row in rows:
        for key, label in (("prefill", row["method"]), ("end", "  after decoding")):
            if key == "end" and not row["decoding"]:
                continue
            cells = [
                ",".join("=" if o == 1.0 else f"{o:.3f}" for o in layer)
                for layer in row[f"overlap_per_layer_head_{key}"]
            ]
            print(f"{label:<20} " + " ".join(f"{c:<11}" for c in cells))  # fmt: skip
    for row in rows:
        if row["evicts_oldest_while_decoding"]:
            e = row["evicts_oldest_while_decoding"]
            print(f"{row['method']}: while decoding, the entries evicted are the oldest non-sink ones in "
                  f"{e['vlcache']:.2f} of vlcache's heads and {e['kvpress']:.2f} of kvpress's; after prefill, "
                  f"{row['cache_ascending']['kvpress']:.2f} of kvpress's heads hold their entries in position order "
                  f"(vlcache: {row['cache_ascending']['vlcache']:.2f})")  # fmt: skip
    print()
    print("per-layer budgets (prompt tokens kept, KV head 0), where they differ:")
    for row in rows:
        lb = row["layer_budgets"]
        if lb["vlcache"] != lb["kvpress"]:
            print(f"  {row['method']}: vlcache {lb['vlcache']}; kvpress {lb['kvpress']}")
    if not all(row["vlcache_own_record_agrees"] for row in rows):
        print("WARNING: key matching disagrees with vlcache's own slot positions")
    if setup["kept"] < args.window:
        print(f"note: {setup['kept']} kept < window {args.window}: kvpress keeps a tie-broken part of the window")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = dict(
        setup={k: v for k, v in setup.items() if k != "runs"},
        kvpress_version=kv_version,
        vlcache_version=vlcache.__version__,
        entropy_last_rows_vs_uniform=dict(rows=ENTROPY_ROWS, mean=mean(per_layer), per_layer_head=entropy),
        full=dict(
            tokens_vlcache_vs_kvpress=full_agree,
            vlcache=dict(prefill_s=full["prefill_s"], decode_ms=full["decode_ms"], kv_bytes=full["kv_bytes"]),
            kvpress={a: dict(prefill_s=f["prefill_s"], decode_ms=f["decode_ms"], kv_bytes=f["kv_bytes"])
                     for a, f in their_full.items()},
        ),
        rows=rows,
    )  # fmt: skip
    (out / "peer.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out / 'peer.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
