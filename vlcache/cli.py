"""The `vlcache` command line. User mistakes end in one line on stderr and exit status 2, not a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .policies import POLICIES, Full, make_policy


def _amount(text: str):
    """A budget on the command line: '0.1' is a ratio, '512' a token count."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a budget: {text!r} (a ratio like 0.1 or a token count like 512)"
        ) from None


def policy_from_args(name: str, args) -> object:
    if name == "full":
        return Full()
    amounts = {"budget": args.budget}
    if args.vision_budget is not None or args.text_budget is not None:
        amounts = {"vision_budget": args.vision_budget, "text_budget": args.text_budget}
    return make_policy(name, **{k: v for k, v in amounts.items() if v is not None})


def add_budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--budget", type=_amount, default=0.1, help="kept per layer: ratio in (0,1] or token count (default 0.1)"
    )
    p.add_argument(
        "--vision-budget", type=_amount, help="separate budget for vision tokens (text kept whole unless --text-budget)"
    )
    p.add_argument("--text-budget", type=_amount, help="separate budget for text tokens")


def cmd_policies(args) -> int:
    for name, cls in POLICIES.items():
        print(f"{name:<14} {cls.__doc__.strip().splitlines()[0]}")
        if cls.paper:
            print(f"{'':<14} paper: {cls.paper}")
        settings = [f"{f.name}={f.default!r}" for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING]
        print(f"{'':<14} settings: {', '.join(settings)}")
    return 0


def cmd_compare(args) -> int:
    """The main job: caption procedurally generated frames under each policy and compare with the full cache."""
    from . import pipeline
    from .frames import synthetic_video

    model, processor = pipeline.load(args.model)
    frames = synthetic_video(frames=args.frames, size=args.size, seed=args.seed)
    inputs = pipeline.frames_inputs(processor, frames, "Describe the video.", device=next(model.parameters()).device)
    names = ["full"] + [p for p in args.policies.split(",") if p and p != "full"]
    policies = [policy_from_args(n, args) for n in names]  # validate every setting before running anything
    print(
        f"model {args.model}: {args.frames} frames, prompt of {inputs['input_ids'].shape[1]} tokens, {args.max_new_tokens} new tokens"
    )
    header = f"{'policy':<26} {'kept/layer':>10} {'text':>6} {'vision':>7} {'prompt KV':>10} {'saved':>7} {'prefill':>9} {'decode':>11}  output"
    print(header)
    print("-" * len(header))
    for policy in policies:
        r = pipeline.run(model, processor, inputs, policy, args.max_new_tokens)
        s = r.prefill_stats
        vision = s.kept("image") + s.kept("video")
        print(
            f"{s.policy:<26} {s.kept():>10.0f} {s.kept('text'):>6.0f} {vision:>7.0f} {s.kv_bytes:>10,} "
            f"{100 * (1 - s.kv_ratio):>6.1f}% {1000 * r.prefill_s:>7.1f}ms {r.decode_ms_per_token:>7.2f}ms/t  {r.text[:40]!r}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlcache", description="Modality-aware KV-cache compression for Hugging Face VLMs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "compare", help="caption synthetic frames under several policies; print kept tokens and KV saved"
    )
    p.add_argument("--model", default="tiny", help="hub id or local path (default: the embedded tiny model)")
    p.add_argument(
        "--policies", default="snapkv,pyramidkv,h2o,streamingllm,random", help="comma-separated policy names"
    )
    add_budget_args(p)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="frame side in pixels")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("policies", help="list the policies with their settings")
    p.set_defaults(func=cmd_policies)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"vlcache: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except KeyboardInterrupt:
        print("vlcache: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
