"""The `vlcache` command line: `compare` and `policies` here, `caption`, `bench` and `demo` handed to their own
parsers. User mistakes end in one line on stderr and exit status 2, not a traceback (`command_line.run_main`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..policies import POLICIES
from .command_line import add_budget_args, add_compile_arg, policy_from_args, run_main


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, on one line. A docstring's first line can stop
    mid-sentence ("smoothed along the"), so the paragraph is joined first; a period inside parentheses ("(e.g. x)")
    or followed by no space ("0.5") ends nothing."""
    text = " ".join(doc.strip().split("\n\n")[0].split())
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "." and depth <= 0 and (i + 1 == len(text) or text[i + 1] == " "):
            return text[: i + 1]
    return text


def _has_default(f) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _default(f):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # e.g. compose's part_settings


def cmd_policies(args) -> int:
    import textwrap

    for name, cls in POLICIES.items():
        lines = textwrap.wrap(first_sentence(cls.__doc__), 100) or [""]
        print(f"{name:<14} {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<14} {line}")
        if cls.paper:
            print(f"{'':<14} paper: {cls.paper}")
        settings = [f"{f.name}={_default(f)!r}" for f in dataclasses.fields(cls) if _has_default(f)]
        print(f"{'':<14} settings: {', '.join(settings)}")
    return 0


def compare_frames(paths: list[str], frames: int, seed: int) -> tuple[list, str]:
    """(frames, what they are) for `vlcache compare`: one video (or animated image) read as `frames` frames, still
    images one frame each in the order given, or without paths a synthetic video of the embedded model's world."""
    from .video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_frames

    for p in paths:  # before a decoder is asked: decord prints its own log line for a file it cannot open
        if Path(p).suffix.lower() not in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
            known = ", ".join(sorted(VIDEO_SUFFIXES | IMAGE_SUFFIXES))
            raise ValueError(f"{p}: not a video or image file name (one of {known})")
    if not paths:
        import numpy as np

        from .evaluation.tasks import make_example

        return make_example("describe", frames, np.random.default_rng(seed)).frames, f"a synthetic video (seed {seed})"
    if len(paths) == 1:
        return read_frames(paths[0], frames=frames), paths[0]
    videos = [p for p in paths if Path(p).suffix.lower() not in IMAGE_SUFFIXES]
    if videos:  # several videos would need one table each; images and a video cannot share one prompt's frames
        raise ValueError(f"give one video or several images, not {videos[0]} among {len(paths)} files")
    # an animated image among stills counts as its first frame
    return [read_frames(p, frames=1)[0] for p in paths], f"{len(paths)} images"


def cmd_compare(args) -> int:
    """Caption one video (the synthetic one by default) or a few images under each policy and compare with the
    full cache."""
    from .model_loading import load
    from .prompts import answer_tokens, default_question, frames_inputs
    from .timed_run import run

    names = ["full"] + [p for p in args.policies.split(",") if p and p != "full"]
    policies = [policy_from_args(n, args) for n in names]  # validate every setting before loading anything
    for flag in ("frames", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.question is not None and not args.question.strip():
        raise ValueError("--question is empty")
    frames, source = compare_frames(args.inputs, args.frames, args.seed)  # a bad file fails before the model loads
    model, processor = load(args.model, flag="--model")
    question = args.question or default_question(model)
    inputs = frames_inputs(processor, frames, question, device=next(model.parameters()).device)
    max_new = args.max_new_tokens or answer_tokens(model, default=32)
    print(
        f"model {args.model}: {source}, {len(frames)} frames, prompt of {inputs['input_ids'].shape[1]} tokens, "
        f"{max_new} new tokens"
    )
    header = f"{'policy':<26} {'kept/layer':>10} {'text':>6} {'vision':>7} {'prompt KV':>10} {'saved':>7} {'prefill':>9} {'decode':>11}  output"
    print(header)
    print("-" * len(header))
    for policy in policies:
        r = run(model, processor, inputs, policy, max_new, compile=args.compile)
        s = r.prefill_stats
        vision = s.kept("image") + s.kept("video")
        print(
            f"{s.policy:<26} {s.kept():>10.0f} {s.kept('text'):>6.0f} {vision:>7.0f} {s.kv_bytes:>10,} "
            f"{100 * (1 - s.kv_ratio):>6.1f}% {1000 * r.prefill_s:>7.1f}ms {r.decode_ms_per_token:>7.2f}ms/t  {r.text[:40]!r}"
        )
    return 0


BENCHES = ("quality", "speed", "decode", "kernels", "peer", "reuse", "quant")


def run_bench(argv: list[str]) -> int:
    import importlib

    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHES:
        print(f"usage: vlcache bench {{{','.join(BENCHES)}}} [options]   (each takes --help)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return importlib.import_module(f"vlcache.apps.bench.{argv[0]}").main(argv[1:])


def run_caption(argv: list[str]) -> int:
    from .caption import main as caption

    return caption(argv)


def run_demo(argv: list[str]) -> int:
    from .demo import main as demo

    return demo(argv)


# commands with parsers of their own: everything after their name goes to them untouched
DELEGATED = {"caption": run_caption, "bench": run_bench, "demo": run_demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlcache", description="Modality-aware KV-cache compression for Hugging Face VLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "compare", help="one video (or images) under every policy: kept tokens, KV saved, times, the output"
    )
    p.add_argument(
        "inputs", nargs="*", metavar="VIDEO", help="a video, or several images (default: a synthetic 8-frame video)"
    )
    p.add_argument(
        "--model",
        default="embedded",
        help="hub id, local path, embedded-qwen (the Qwen2-VL embedded model) or tiny (default: the embedded Llava)",
    )
    p.add_argument(
        "--policies", default=",".join(n for n in POLICIES if n != "full"), help="comma-separated policy names"
    )
    add_budget_args(p)
    p.add_argument("--frames", type=int, default=8, help="frames spread uniformly over the video (default 8)")
    p.add_argument("--question", default=None, help="the prompt (default: the model's caption question)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 9 for the embedded model "
                   "(its longest answer), else 32")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="of the synthetic video")
    add_compile_arg(p)
    p.set_defaults(func=cmd_compare)

    sub.add_parser("caption", help="caption videos into JSONL with a compressed cache (vlcache caption --help)")

    p = sub.add_parser("policies", help="list the policies with their settings")
    p.set_defaults(func=cmd_policies)

    sub.add_parser(
        "bench", help="benchmarks: quality, speed, decode, kernels, peer, reuse, quant (vlcache bench NAME --help)"
    )
    sub.add_parser("demo", help="the Gradio demo: compare answers with and without compression (vlcache demo --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return run_main(DELEGATED[argv[0]], argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_main(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
