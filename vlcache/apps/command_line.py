"""What the command-line apps (`vlcache`, `vlcache caption`, the demo's launcher) share: the budget and policy
flags, and running a command so that user mistakes end in one line on stderr and exit status 2, not a traceback."""

from __future__ import annotations

import argparse
import os
import sys

from ..policies import Full, make_policy, parse_settings, setting_type_error


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
    amounts = {"budget": args.budget, "vision_budget": args.vision_budget, "text_budget": args.text_budget}
    if all(v is None for v in amounts.values()):  # the command's default, e.g. "--budget 0.1"
        flag, value = args.default_budget.split()
        amounts[flag.lstrip("-").replace("-", "_")] = _amount(value)
    amounts = {k: v for k, v in amounts.items() if v is not None}
    settings = parse_settings(getattr(args, "set", None) or [])
    _check_setting_types(type(make_policy(name, **amounts)), settings)  # also reports a bad name or budget
    try:
        return make_policy(name, **amounts, **settings)
    except TypeError as e:  # a value of a type the policy's checks cannot compare; named, not a traceback
        raise ValueError(f"{name}: a --set value has the wrong type ({e})") from None


def _check_setting_types(cls, settings: dict) -> None:
    """--set values of the kind each setting's default is, named as the user typed them."""
    wrong = setting_type_error(cls, settings)
    if wrong:
        raise ValueError(f"--set {wrong}")


def add_budget_args(p: argparse.ArgumentParser, default: str = "--budget 0.1") -> None:
    """--budget / --vision-budget / --text-budget; `default` applies when none is given."""
    p.add_argument("--budget", type=_amount, help="kept per layer: a ratio in (0,1] or a token count")
    p.add_argument("--vision-budget", type=_amount, help="for vision tokens (text kept whole unless --text-budget)")
    p.add_argument("--text-budget", type=_amount, help="for text tokens")
    p.add_argument(
        "--set",
        action="append",
        metavar="NAME=VALUE",
        help="a policy setting, repeatable: --set evict_every=16 --set recent=0.3 (`vlcache policies` lists them)",
    )
    p.set_defaults(default_budget=default)
    p.epilog = ((p.epilog or "") + f" Without a budget flag: {default}.").strip()


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode steps over a static-capacity cache (torch.compile; CUDA graphs on a GPU)",
    )


def run_main(fn, *args) -> int:
    """Run a command; user mistakes end in one line on stderr and exit status 2, not a traceback."""
    try:
        return fn(*args)
    except BrokenPipeError:  # output piped into `head` and closed early (an OSError: caught before the rest)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        return 0
    except (ValueError, OSError, RuntimeError) as e:  # OSError: an unwritable or full output, a missing input
        print(f"vlcache: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vlcache: interrupted", file=sys.stderr)
        return 130
