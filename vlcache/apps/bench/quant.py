"""KV quantization benchmark: memory, decode speed and agreement of quantized caches, composed with eviction, beside
transformers' QuantizedCache, and accuracy on the embedded model's tasks; every ratio measured in one run.

    vlcache bench quant                          # all three parts on the CPU (~15 minutes on 2 cores)
    vlcache bench quant --parts speed --device cuda --preset qwen2vl-7b --sizes 32768
    vlcache bench quant --quick                  # tiny, for CI

- speed: the speed benchmark's Qwen2-VL (random weights), images of 256 tokens: decode ms per token (the fastest of
  `--repeat` rounds that take the rows in turn), KV bytes (codes, scales and zero points counted), peak memory, each
  quantized row against the same policy unquantized.
- peer: a config-built Llama (the peer benchmark's), one text prompt: the full cache, transformers' QuantizedCache
  (quanto backend, if installed) and vlcache's `full` quantized alike (text_bits), each against the full cache.
- quality: the embedded model, every task, bits 16/8/4/2 for keep-all and VL-Cache keeping 10% of the vision
  tokens, plus mixed widths; then agreement / KL against the full cache on describe.

Prints tables, writes <out>/quant.json and <out>/quant.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ...policies import make_policy, parse_settings
from ..evaluation.tasks import EVAL_TASKS
from . import comma_items, fill_flags, first_paragraph, token_counts

SPEED_ROWS = (
    "full",
    "full:vision_bits=8;text_bits=8",
    "vlcache",
    "vlcache:vision_bits=8;text_bits=8",
    "vlcache:vision_bits=4;text_bits=8",
    "vlcache:vision_bits=2;text_bits=4",
)
QUALITY_ROWS = (
    *(f"full:vision_bits={b};text_bits={b}" for b in (16, 8, 4, 2)),
    *(f"vlcache:vision_bits={b};text_bits={b}" for b in (16, 8, 4, 2)),
    "vlcache:vision_bits=4;text_bits=8",
)


def policy(spec: str, **amount):
    """ "name:setting=value;..." -> a policy; `full` takes no budget."""
    name, _, extra = spec.partition(":")
    settings = parse_settings([x for x in extra.split(";") if x])
    return make_policy(name, **settings) if name == "full" else make_policy(name, **amount, **settings)


def unquantized(spec: str) -> str:
    """The same policy at 16 bits (what a quantized row is compared with)."""
    name, _, extra = spec.partition(":")
    keep = [x for x in extra.split(";") if x and not x.split("=")[0].strip().startswith(("vision_bits", "text_bits"))]
    return name + (":" + ";".join(keep) if keep else "")


def storage_bytes(t) -> int:
    """Bytes a tensor holds, through tensor subclasses (quanto's packed tensors hold their parts inside)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor:
        names, _ = t.__tensor_flatten__()
        return sum(storage_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------------------- speed


def decode_cpu_ms(model, inputs, pol, new_tokens: int) -> float:
    """CPU time this process spends per decode step (every forward after the prompt's), in ms: unlike wall time it
    does not grow while other processes hold the cores (run it with one thread)."""
    import vlcache

    spent, marks = [], []
    handles = [
        model.register_forward_pre_hook(lambda *_: marks.append(time.process_time()), prepend=True),
        model.register_forward_hook(lambda *_: spent.append(time.process_time() - marks[-1])),
    ]
    try:
        with vlcache.compress(model, pol) if pol is not None else nullcontext(), torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    return 1000 * sum(spent[1:]) / max(1, len(spent) - 1)


def run_speed(args) -> list[dict]:
    from .speed import PRESETS, build_model, measure, prompt

    preset = dict(PRESETS[args.preset])
    device = preset["device"] if args.device is None else args.device
    preset["device"] = device
    sizes = args.sizes
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"the speed part on {device} needs a GPU")
    torch.manual_seed(0)
    model = build_model(preset, max(sizes))
    amount = {"vision_budget": args.vision_budget}
    rows = []
    for n in sizes:
        inputs = prompt(model, n, device)
        real_n = inputs["input_ids"].shape[1]
        from .. import timed_run

        for spec in args.speed_rows:  # warm-up of every row: Triton compiles, first allocations
            timed_run.run(model, None, inputs, policy(spec, **amount), 2)
        # kv bytes, peak memory and tokens from one run each; decode times from `repeat` rounds over all rows in turn,
        # the fastest of each row kept: on a shared machine the noise is mostly other processes' load, which only adds
        measured = {
            spec: measure(model, inputs, policy(spec, **amount), args.new_tokens, device) for spec in args.speed_rows
        }
        times = {spec: [] for spec in args.speed_rows}
        for _ in range(args.repeat):
            for spec in args.speed_rows:
                r = timed_run.run(
                    model, None, inputs, policy(spec, **amount), args.new_tokens, min_new_tokens=args.new_tokens
                )
                times[spec].append(r.decode_ms_per_token)
        for spec, m in measured.items():
            m["decode_ms"], m["decode_runs"] = min(times[spec]), times[spec]
        if args.cpu_time:  # one thread, so that CPU time is the work done and not spinning threads
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            cpu = {spec: [] for spec in args.speed_rows}
            for _ in range(args.repeat):
                for spec in args.speed_rows:
                    cpu[spec].append(decode_cpu_ms(model, inputs, policy(spec, **amount), args.new_tokens))
            torch.set_num_threads(threads)
            for spec, m in measured.items():
                m["decode_cpu_ms"] = min(cpu[spec])
        full = measured["full"]
        print(f"\nprompt {real_n} tokens ({device}; vision_budget {args.vision_budget} for vlcache rows)")
        print(
            f"{'policy':<46} {'KV MiB':>8} {'x full':>7} {'peak MiB':>9} {'x full':>7} {'decode ms/t':>12} {'x 16-bit':>8} {'agree':>6}"
        )
        for spec, m in measured.items():
            base = measured.get(unquantized(spec))
            row = dict(
                n=real_n,
                policy=spec,
                kv_bytes=m["kv_bytes"],
                kv_ratio=m["kv_bytes"] / full["kv_bytes"],
                peak_bytes=m["peak_bytes"],
                peak_ratio=m["peak_bytes"] / full["peak_bytes"] if full["peak_bytes"] else None,
                decode_ms=m["decode_ms"],
                decode_runs=m["decode_runs"],
                decode_cpu_ms=m.get("decode_cpu_ms"),
                decode_cpu_vs_16bit=m["decode_cpu_ms"] / base["decode_cpu_ms"]
                if base and "decode_cpu_ms" in m
                else None,
                prefill_s=m["prefill_s"],
                decode_vs_16bit=m["decode_ms"] / base["decode_ms"] if base else None,
                agreement=sum(a == b for a, b in zip(m["tokens"], full["tokens"])) / len(full["tokens"]),
            )
            rows.append(row)
            vs = f"{row['decode_vs_16bit']:>8.2f}" if row["decode_vs_16bit"] is not None else f"{'-':>8}"
            if row["decode_cpu_ms"] is not None:
                cvs = row["decode_cpu_vs_16bit"]
                vs += f"   CPU time {row['decode_cpu_ms']:.2f} ms/t" + (f" ({cvs:.2f}x 16-bit)" if cvs else "")
            print(
                f"{spec:<46} {m['kv_bytes'] / 2**20:>8.2f} {row['kv_ratio']:>7.3f} {m['peak_bytes'] / 2**20:>9.1f} "
                f"{row['peak_ratio'] or 0:>7.2f} {m['decode_ms']:>12.2f} {vs} {row['agreement']:>6.2f}"
            )
    return rows


# ---------------------------------------------------------------------------------------------------------- peer


def run_peer(args) -> dict:
    import transformers as T

    import vlcache

    from ...hf.compat import CACHE_KWARG
    from .greedy import greedy
    from .peer import DIMS

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**DIMS)).eval()
    ids = torch.randint(4, 104, (1, args.peer_tokens), generator=torch.Generator().manual_seed(1))
    out = {"setup": dict(config=DIMS, tokens=args.peer_tokens, new_tokens=args.new_tokens), "rows": []}

    def hf_bytes(cache):
        total = 0
        for layer in cache.layers:
            for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += storage_bytes(t)
        return total

    def one(make_cache, session_policy, new_tokens):
        with vlcache.compress(model, session_policy) if session_policy is not None else nullcontext() as s:
            cache = s.new_cache() if s is not None else make_cache()
            r = greedy(model, ids, cache, new_tokens, cache_kwarg=CACHE_KWARG)
        r["kv_bytes"] = cache.nbytes() if s is not None else hf_bytes(cache)
        return r

    configs = [("HF DynamicCache (full)", lambda: T.DynamicCache(config=model.config), None)]
    why = None
    try:
        import optimum.quanto  # noqa: F401
    except ImportError as e:
        why = f"optimum-quanto is not installed ({e}); pip install --no-deps optimum-quanto"
    for bits in (4, 2):
        if why is None:

            def make(bits=bits):
                return T.QuantizedCache(
                    backend="quanto", config=model.config, nbits=bits, q_group_size=64, residual_length=128
                )

            configs.append((f"HF QuantizedCache quanto int{bits} (G=64, R=128)", make, None))
        configs.append((f"vlcache full, text_bits={bits} (G=32, R=128)", None, make_policy("full", text_bits=bits)))
    runs = []
    for label, make_cache, session_policy in configs:
        one(make_cache, session_policy, 2)  # warm-up
        runs.append({"label": label, **one(make_cache, session_policy, args.new_tokens)})
    for _ in range(args.repeat - 1):  # rounds over every cache in turn; the fastest decode counts
        for r, (_, make_cache, session_policy) in zip(runs, configs):
            r["decode_ms"] = min(r["decode_ms"], one(make_cache, session_policy, args.new_tokens)["decode_ms"])
    full = runs[0]
    print(
        f"\nQuantizedCache side by side: Llama {DIMS['num_hidden_layers']}x{DIMS['hidden_size']}, {args.peer_tokens}-token prompt, {args.new_tokens} new tokens"
    )
    if why:
        print(f"(transformers' QuantizedCache not run: {why})")
    print(f"{'cache':<44} {'KV MiB':>8} {'x full':>7} {'decode ms/t':>12} {'x full':>7} {'agree':>6}")
    for r in runs:
        row = dict(
            cache=r["label"],
            kv_bytes=r["kv_bytes"],
            kv_ratio=r["kv_bytes"] / full["kv_bytes"],
            decode_ms=r["decode_ms"],
            decode_ratio=r["decode_ms"] / full["decode_ms"],
            prefill_s=r["prefill_s"],
            agreement=sum(a == b for a, b in zip(r["tokens"], full["tokens"])) / len(full["tokens"]),
        )
        out["rows"].append(row)
        print(
            f"{row['cache']:<44} {r['kv_bytes'] / 2**20:>8.2f} {row['kv_ratio']:>7.3f} {r['decode_ms']:>12.2f} "
            f"{row['decode_ratio']:>7.2f} {row['agreement']:>6.2f}"
        )
    out["not_run"] = why
    return out


# ---------------------------------------------------------------------------------------------------------- quality


def run_quality(args) -> dict:
    import numpy as np

    from ..evaluation.embedded_model import batch_inputs, load_embedded
    from ..evaluation.quality import accuracy, fidelity, kv_ratio
    from ..evaluation.tasks import make_example
    from .quality import HELD_OUT

    model, processor = load_embedded()
    frames = 8
    amount = {"vision_budget": 0.1}
    tasks = args.tasks
    acc = {}
    print(
        f"\naccuracy, embedded model, {frames} frames, n={args.n} per cell (vlcache rows keep 10% of the vision tokens)"
    )
    print(f"{'policy':<52}" + "".join(f"{t:>9}" for t in tasks) + f"{'KV x full':>10}")
    rng = np.random.default_rng(HELD_OUT + 7)
    examples = [make_example("describe", frames, rng) for _ in range(min(args.n, 50))]
    fid_inputs = batch_inputs(processor, examples)
    reference = None
    fid = {}
    for spec in args.quality_rows:
        p = policy(spec, **amount)
        row = {}
        for task in tasks:
            seed = HELD_OUT + 1000 * frames + EVAL_TASKS.index(task)
            row[task] = accuracy(model, processor, task, frames, p, args.n, seed)
        ratio = kv_ratio(model, fid_inputs, p)
        acc[spec] = {"accuracy": row, "kv_ratio": ratio}
        print(f"{spec:<52}" + "".join(f"{row[t]:>9.2f}" for t in tasks) + f"{ratio:>10.3f}")
    print(f"\nfidelity vs the full cache (describe, {frames} frames, {frames + 1} tokens): agreement / KL")
    for spec in args.fidelity_rows:
        f = fidelity(model, fid_inputs, policy(spec, **amount), frames + 1, reference)
        reference = f.pop("reference")
        fid[spec] = f
        print(f"{spec:<52} {f['agreement']:>6.3f} / {f['kl']:.4f}")
    return {"frames": frames, "n": args.n, "tasks": tasks, "accuracy": acc, "fidelity": fid}


PARTS = ("speed", "peer", "quality")
# --quick: the values of the flags it was not given (what CI runs); the rest stay the user's, checked the same way
QUICK = dict(
    preset="quick",
    sizes="512",
    new_tokens=4,
    peer_tokens=256,
    n=4,
    repeat=1,
    tasks="needle",
    quality_rows="full:vision_bits=8;text_bits=8,vlcache:vision_bits=4;text_bits=8",
)
DEFAULTS = dict(
    preset="cpu",
    sizes="4096",
    new_tokens=32,
    peer_tokens=4096,
    n=100,
    repeat=5,
    tasks=",".join(EVAL_TASKS),
    quality_rows=",".join(QUALITY_ROWS),
)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with --parts, --sizes, --speed-rows, --quality-rows, --fidelity-rows and --tasks as lists,
    every value checked before a model is built (a mistake is one line naming the flag, exit status 2)."""
    from .speed import PRESETS

    p = argparse.ArgumentParser(prog="vlcache bench quant", description=first_paragraph(__doc__))
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    p.add_argument(
        "--preset",
        default=None,
        choices=list(PRESETS),
        help="speed: a preset of the speed benchmark (default cpu; --quick: quick)",
    )
    p.add_argument("--device", default=None, help="speed: override the preset's device")
    p.add_argument("--sizes", default=None, help="speed: prompt lengths in tokens (default 4096; --quick: 512)")
    p.add_argument("--vision-budget", type=float, default=0.1, help="speed: the vlcache rows' vision budget")
    p.add_argument("--speed-rows", default=",".join(SPEED_ROWS))
    p.add_argument(
        "--new-tokens", type=int, default=None, help="speed and peer: generated tokens (default 32; --quick: 4)"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="speed: timed rounds over the rows; the fastest counts (default 5; --quick: 1)",
    )
    p.add_argument("--cpu-time", action="store_true", help="speed: also CPU time per decode token, one thread")
    p.add_argument("--peer-tokens", type=int, default=None, help="peer: prompt length (default 4096; --quick: 256)")
    p.add_argument(
        "--quality-rows",
        default=None,
        help="quality: comma-separated policies (default: bits 16/8/4/2 for full and vlcache, and mixed widths; "
        "--quick: two)",
    )
    p.add_argument(
        "--fidelity-rows", default=None, help="quality: rows of the fidelity table (default: --quality-rows)"
    )
    p.add_argument("--tasks", default=None, help="quality: tasks (default: every embedded task; --quick: needle)")
    p.add_argument("--n", type=int, default=None, help="quality: held-out examples per cell (default 100; --quick: 4)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for CI, for the flags not given")
    p.add_argument("--out", default="out/quant")
    args = p.parse_args(argv)
    fill_flags(args, QUICK, DEFAULTS)  # an explicit flag wins over --quick

    def rows(flag: str, text: str, **amount) -> list[str]:
        specs = comma_items(p, flag, text)
        for spec in specs:  # a bad name or setting is said before anything is built
            try:
                policy(spec, **amount)
            except (ValueError, TypeError, KeyError) as e:
                p.error(f"{flag} {spec!r}: {e}")
        return specs

    args.parts = comma_items(p, "--parts", args.parts)
    for part in args.parts:
        if part not in PARTS:
            p.error(f"--parts: no part {part!r}; choose from {', '.join(PARTS)}")
    for flag, value in (
        ("--new-tokens", args.new_tokens),
        ("--repeat", args.repeat),
        ("--peer-tokens", args.peer_tokens),
        ("--n", args.n),
    ):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    args.sizes = token_counts(p, "--sizes", args.sizes)
    if args.device is not None:
        try:
            torch.device(args.device)
        except RuntimeError:
            p.error(f"--device takes a torch device (cpu, cuda, cuda:1), got {args.device!r}")
    try:
        make_policy("vlcache", vision_budget=args.vision_budget)
    except ValueError as e:
        p.error(f"--vision-budget: {e}")
    args.speed_rows = rows("--speed-rows", args.speed_rows, vision_budget=args.vision_budget)
    if "full" not in args.speed_rows:
        args.speed_rows.insert(0, "full")
    args.tasks = comma_items(p, "--tasks", args.tasks)
    for task in args.tasks:
        if task not in EVAL_TASKS:
            p.error(f"--tasks: no task {task!r}; choose from {', '.join(EVAL_TASKS)}")
    args.quality_rows = rows("--quality-rows", args.quality_rows, vision_budget=0.1)
    args.fidelity_rows = (
        rows("--fidelity-rows", args.fidelity_rows, vision_budget=0.1) if args.fidelity_rows else args.quality_rows
    )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    parts = args.parts
    started = time.time()
    from .speed import PRESETS

    # the speed part runs on the preset's device unless --device says otherwise: the label names where it ran
    device = PRESETS[args.preset]["device"] if args.device is None else args.device
    on_gpu = "speed" in parts and device.startswith("cuda")
    result = {"device": torch.cuda.get_device_name(device) if on_gpu else f"CPU, {torch.get_num_threads()} threads"}
    if "speed" in parts:
        result["speed"] = run_speed(args)
    if "peer" in parts:
        result["peer"] = run_peer(args)
    if "quality" in parts:
        result["quality"] = run_quality(args)
    result["seconds"] = time.time() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant.json").write_text(json.dumps(result, indent=2) + "\n")
    if "speed" in result:
        plot(result["speed"], out / "quant.png")
    print(f"\n{result['seconds']:.0f}s; wrote {out / 'quant.json'}")
    return 0


def plot(rows, path):
    from .figure import figure_row

    n = max(r["n"] for r in rows)
    pts = [r for r in rows if r["n"] == n]
    with figure_row(path, 2, (12, 3.8), f"KV quantization, prompt of {n} tokens") as axes:
        names = [r["policy"].replace(":", "\n").replace(";", " ") for r in pts]
        axes[0].barh(names, [r["kv_ratio"] for r in pts])
        axes[0].set_xscale("log")
        axes[0].set_xlabel("KV bytes (x full cache)")
        axes[1].barh(names, [r["decode_ms"] for r in pts])
        axes[1].set_xlabel("decode ms / token")
        for ax in axes:
            ax.invert_yaxis()
            ax.tick_params(axis="y", labelsize=6)
            ax.grid(alpha=0.3)


if __name__ == "__main__":
    sys.exit(main())
