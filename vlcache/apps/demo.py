"""The Gradio demo: ask about a video (or a few images) with and without KV-cache compression, side by side.

    vlcache demo                      # http://127.0.0.1:7860, the embedded model, CPU is fine
    vlcache demo --models embedded,Qwen/Qwen2-VL-2B-Instruct --port 7861
    python demo/app.py --port 7861

Shows both answers, the KV memory each one held, prefill and decode times, for each frame which of its patches the
policy kept (outlined over the frame; one layer, or averaged over layers and heads), and a budget sweep: how much of
the answer agrees with the full cache's from 1% to 50% kept. It opens on VL-Cache keeping 10% of the vision tokens,
scoring with the first generated token too (`lookahead=1`) and splitting each layer's budget between its heads
(`head_budgets="adaptive"`): the combination that wins most cells of the quality benchmark on the embedded model.
`prune_at` (drop the evicted tokens from the hidden states after a layer) is one choice away. A thin consumer of the
public API.

Visitors choose only among the models given at launch (`--models`), never a path or hub id of their own. A model
loads in a worker thread, outside any lock a request waits on: a request for a model still loading gets "try
again" after `--load-timeout` seconds, and requests for other models go on meanwhile. At most `--keep-models`
models stay loaded (least recently used leaves first). Questions are capped at MAX_QUESTION_CHARS characters and
uploads at MAX_FILE_MB, the latter by Gradio while the upload streams in, before anything is stored. It listens on
127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MAX_FRAMES = 32
MAX_FILE_MB = 50
MAX_QUESTION_CHARS = 500  # the embedded tokenizer is per character: a 100,000-character question ran for minutes
MODELS = ["embedded", "tiny"]  # the built-in ones; any others come from --models
LOAD_TIMEOUT_S = 20.0
# what the page opens on: the quality benchmark's best on the embedded model (README, "Cutting prefill")
DEFAULT_POLICY, DEFAULT_BUDGET, DEFAULT_PRUNE_AT = "vlcache", 0.1, "off"
DEFAULT_LOOKAHEAD, DEFAULT_ADAPTIVE_HEADS = "1", True
SWEEP_BUDGETS = (0.01, 0.03, 0.05, 0.1, 0.25, 0.5)  # the quality tables' budgets below 100%
# Both runs are timed twice, in turn, when the pair takes less than this: a shared CPU can stall one run of the
# small model for longer than the whole difference between the caches, and the faster of two is the steadier
TIMING_REPEAT_S = 3.0


class Runner:
    """Loads the configured models in the background and runs one comparison at a time per model (a model is
    shared between requests, its compression session is not)."""

    def __init__(self, models=("embedded",), *, load_timeout: float = LOAD_TIMEOUT_S, keep: int = 2, loader=None):
        from . import model_loading

        if not models:
            raise ValueError("give at least one model")
        if keep < 1:
            raise ValueError(f"--keep-models must be at least 1, got {keep}")
        self.models = tuple(dict.fromkeys(models))
        self.load_timeout, self.keep = load_timeout, keep
        self._load = loader or model_loading.load
        self._loads: OrderedDict[str, object] = OrderedDict()  # name -> Future of (model, processor)
        self._loads_lock = threading.Lock()  # held for bookkeeping only, never while a model loads or runs
        self._run_locks = {name: threading.Lock() for name in self.models}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="vlcache-demo-load")

    def model(self, name: str):
        if name not in self.models:
            raise ValueError(f"model {name!r} is not offered here; choose one of {', '.join(self.models)}")
        with self._loads_lock:
            future = self._loads.get(name)
            if future is None or (future.done() and future.exception() is not None):  # first use, or retry
                future = self._loads[name] = self._pool.submit(self._load, name)
            self._loads.move_to_end(name)
            evictable = [n for n, f in self._loads.items() if n != name and f.done()]  # least recently used first
            for old in evictable[: max(0, len(self._loads) - self.keep)]:
                del self._loads[old]  # its memory goes once no request still holds it
        try:
            return future.result(timeout=self.load_timeout)
        except FutureTimeout:
            raise ValueError(f"model {name!r} is still loading; try again in a moment") from None
        except Exception as e:  # the loader's own error, kept for the page in one line
            raise ValueError(f"cannot load model {name!r}: {str(e).strip().splitlines()[0][:300]}") from None

    def compare(
        self,
        frames,
        question: str,
        model_name: str,
        policy_name: str,
        budget: float,
        vision_only: bool,
        layer: str,
        prune_at: str = "off",
        sweep: bool = True,
        label: str = "frame",
        lookahead: str = "off",
        adaptive_heads: bool = False,
    ):
        """(report markdown, kept-patch picture, budget-sweep plot or None) for one question about `frames`."""
        from ..modality import layout_from_inputs
        from ..policies import Full
        from . import prompts, timed_run
        from .viz import agreement_plot, heatmap, kept_fraction

        check_question(question)
        make = _policy_maker(policy_name, vision_only, prune_at, lookahead, adaptive_heads)
        policy = make(budget)  # a bad setting fails before a model loads
        model, processor = self.model(model_name)  # outside the run lock: a slow load blocks nobody else
        with self._run_locks[model_name]:
            question = question.strip() or prompts.default_question(model)
            inputs = prompts.frames_inputs(processor, frames, question, device=next(model.parameters()).device)
            width = prompts.answer_tokens(model, default=48)
            full = timed_run.run(model, processor, inputs, Full(), width)
            small = timed_run.run(model, processor, inputs, policy, width)
            timed = 1
            if full.total_s + small.total_s < TIMING_REPEAT_S:
                full = min(full, timed_run.run(model, processor, inputs, Full(), width), key=lambda r: r.total_s)
                small = min(small, timed_run.run(model, processor, inputs, policy, width), key=lambda r: r.total_s)
                timed = 2
            layout = layout_from_inputs(model.config, inputs)
            swept = budget_sweep(model, processor, inputs, make, full.tokens, width) if sweep else None
        which = None if layer in ("", "average") else int(layer)
        if which is not None and which not in small.kept_positions:
            raise ValueError(f"layer {which} is not compressible; choose one of {sorted(small.kept_positions)}")
        picture = heatmap(frames, layout, kept_fraction(layout, small.kept_positions, which), label=label)
        plot = None
        if swept is not None:
            what = "this video" if label == "frame" else "these images"
            settings = "".join(f", {k}={v}" for k, v in policy.changed_settings().items())
            title = f"{policy_name} ({'vision tokens' if vision_only else 'all tokens'}{settings}) on {what}"
            plot = agreement_plot(list(SWEEP_BUDGETS), swept, title, chosen=budget)
        return report(full, small, policy, timed), picture, plot


def _policy_maker(policy_name: str, vision_only: bool, prune_at: str, lookahead: str = "off", adaptive_heads=False):
    """budget -> the policy the page describes (its budget on the vision tokens or on all of them)."""
    from ..policies import make_policy

    settings = {} if prune_at in ("", "off", None) else {"prune_at": int(prune_at)}
    if adaptive_heads:
        settings["head_budgets"] = "adaptive"
    looks = lookahead not in ("", "off", None)

    def make(budget: float):
        amount = {"vision_budget": budget} if vision_only else {"budget": budget}
        policy = make_policy(policy_name, **amount, **settings)
        if looks and policy.looks_ahead:
            # only the methods that score from a set of rows take it (the policy says, a composition by its
            # scorer); the report's label says what ran
            policy = make_policy(policy_name, **amount, **settings, lookahead=int(lookahead))
        return policy

    return make


def budget_sweep(
    model, processor, inputs, make, reference: list[int], width: int, budgets=SWEEP_BUDGETS
) -> list[float]:
    """The answer's agreement with the full cache's (`reference`, its tokens) under `make(budget)` at each budget."""
    from . import timed_run

    return [agreement(timed_run.run(model, processor, inputs, make(b), width).tokens, reference) for b in budgets]


def agreement(tokens: list[int], reference: list[int]) -> float:
    """The share of the reference answer's positions where `tokens` has the same token (an answer that stops early
    or runs on counts the missing or extra positions as disagreeing)."""
    same = sum(a == b for a, b in zip(tokens, reference))
    return same / max(len(tokens), len(reference), 1)


def check_question(question: str) -> None:
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"the question has {len(question):,} characters; the demo takes up to {MAX_QUESTION_CHARS}")


def report(full, small, policy, timed: int = 1) -> str:
    """The side-by-side table; `timed` > 1: the times are each run's fastest of that many."""
    f, s = full.prefill_stats, small.prefill_stats

    def kib(n):
        return f"{n / 1024:,.1f} KiB"

    rows = [
        ("answer", f"`{full.text.strip()}`", f"`{small.text.strip()}`"),
        ("agreement with the full cache", "100%", f"{agreement(small.tokens, full.tokens):.0%} of tokens"),
        ("tokens kept per layer", f"{f.kept():.0f} of {f.prompt_tokens}", f"{s.kept():.0f} of {s.prompt_tokens}"),
        ("vision tokens kept", f"{f.kept('image') + f.kept('video'):.0f}", f"{s.kept('image') + s.kept('video'):.0f}"),
        ("KV cache after prefill", kib(f.kv_bytes), f"{kib(s.kv_bytes)} ({100 * (1 - s.kv_ratio):.0f}% saved)"),
        ("prefill", f"{1000 * full.prefill_s:.1f} ms", f"{1000 * small.prefill_s:.1f} ms"),
        ("decode (median step)", f"{full.decode_ms_median:.1f} ms/token", f"{small.decode_ms_median:.1f} ms/token"),
    ]
    lines = [f"| | full cache | {s.policy} |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    same = "the same answer" if full.text == small.text else "a different answer"
    note = f" Times: the faster of {timed} runs each." if timed > 1 else ""
    return "\n".join(lines) + f"\n\nWith compression the model gave {same}.{note}"


def load_frames(video, images, frames: int):
    """Frames from an uploaded video or images, with the demo's limits."""
    from PIL import Image

    from .video import VideoError, read_frames

    if frames < 1 or frames > MAX_FRAMES:
        raise ValueError(f"frames must be between 1 and {MAX_FRAMES}")
    paths = [video] if video else [getattr(f, "name", f) for f in (images or [])]
    if not paths:
        raise ValueError("upload a video or some images first")
    for p in paths:
        size = Path(p).stat().st_size / 2**20
        if size > MAX_FILE_MB:
            raise ValueError(f"{Path(p).name} is {size:.0f} MB; the demo takes files up to {MAX_FILE_MB} MB")
    if video:
        try:
            return read_frames(video, frames=frames, cap=MAX_FRAMES)
        except VideoError as e:
            raise ValueError(f"cannot use this video: {e}") from e
    if len(paths) > MAX_FRAMES:
        raise ValueError(f"{len(paths)} images; the demo takes up to {MAX_FRAMES}")
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(im.convert("RGB"))
        except OSError as e:
            raise ValueError(f"cannot read image {Path(p).name}: {e}") from e
    return out


HEATMAP_ID, SWEEP_ID, VIDEO_ID = "kept-patches", "budget-sweep", "input-video"  # ids the browser check looks up


def build(runner: Runner | None = None):
    import gradio as gr

    from ..policies import POLICIES
    from .samples import ensure_samples

    runner = runner or Runner()
    samples = [str(p) for p in ensure_samples()]

    def run(
        video, images, question, model_name, policy_name, budget, vision_only, frames, layer, prune_at, sweep,
        lookahead, adaptive_heads,
    ):  # fmt: skip
        try:
            check_question(question or "")  # before any frame is decoded
            picked = load_frames(video, images, int(frames))
            return runner.compare(
                picked, question or "", model_name, policy_name, float(budget), bool(vision_only), str(layer),
                str(prune_at), bool(sweep), "frame" if video else "image", lookahead=str(lookahead),
                adaptive_heads=bool(adaptive_heads),
            )  # fmt: skip
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from e

    with gr.Blocks(title="vlcache demo") as app:
        gr.Markdown(
            "## vlcache: KV-cache compression for vision-language models\n"
            "Ask about a video with the full cache and with a compressed one. The embedded model reads synthetic "
            "videos of coloured squares. Its answer to `describe?` names the colours that appear, one place per "
            "colour in the order r g b y p o w c (red, green, blue, yellow, purple, orange, white, cyan), `.` for "
            "absent; it also answers `color?` (one object), `where?` (its frame), `find r?` (the frame of the red "
            "object, or of any colour named) and `count?` (frames with an object)."
        )
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="video", sources=["upload"], height=260, elem_id=VIDEO_ID)
                gr.Examples([[s] for s in samples], inputs=[video], label="sample videos")
                images = gr.File(label="or images", file_count="multiple", file_types=["image"])
                question = gr.Textbox(
                    label="question (empty: the model's caption question)", value="", max_length=MAX_QUESTION_CHARS
                )
                with gr.Row():
                    model_name = gr.Dropdown(list(runner.models), value=runner.models[0], label="model")
                    names = [p for p in POLICIES if p != "full"]
                    policy_name = gr.Dropdown(names, value=DEFAULT_POLICY, label="policy")
                with gr.Row():
                    budget = gr.Slider(0.01, 1.0, value=DEFAULT_BUDGET, step=0.01, label="budget (share kept)")
                    vision_only = gr.Checkbox(value=True, label="vision tokens only (keep all text)")
                with gr.Row():
                    prune_at = gr.Dropdown(
                        ["off"] + [str(i) for i in range(32)], value=DEFAULT_PRUNE_AT,
                        label="prune hidden states after layer (prune_at)",
                    )  # fmt: skip
                    lookahead = gr.Dropdown(
                        ["off", "1", "2", "4"], value=DEFAULT_LOOKAHEAD,
                        label="score with the first generated tokens too (lookahead: SnapKV, PyramidKV, VL-Cache)",
                    )  # fmt: skip
                with gr.Row():
                    adaptive_heads = gr.Checkbox(
                        value=DEFAULT_ADAPTIVE_HEADS, label="split each layer's budget between its heads (Ada-KV)"
                    )
                    sweep = gr.Checkbox(value=True, label=f"budget sweep ({len(SWEEP_BUDGETS)} more runs)")
                with gr.Row():
                    frames = gr.Slider(1, MAX_FRAMES, value=8, step=1, label="frames")
                    layer = gr.Dropdown(
                        ["average"] + [str(i) for i in range(32)], value="average", label="heatmap layer"
                    )
                go = gr.Button("Compare", variant="primary")
            with gr.Column():
                result = gr.Markdown(label="result")
                gr.Markdown(
                    "**Budget sweep**: the share of the answer's tokens that equal the full cache's, with the same "
                    "policy at each budget; where it drops, compression starts to cost."
                )
                plot = gr.Image(type="pil", format="png", show_label=False, buttons=[], elem_id=SWEEP_ID)
        gr.Markdown(
            "**Kept patches per frame**: each frame as the model saw it, with the patches that stayed in the cache "
            "outlined in yellow (thicker: kept in more layers and KV heads); bare patches were evicted everywhere."
        )
        # no label badge or toolbar: both sit over the picture's corners, where the first and last titles are
        picture = gr.Image(type="pil", format="png", show_label=False, buttons=[], elem_id=HEATMAP_ID)
        go.click(
            run,
            [
                video,
                images,
                question,
                model_name,
                policy_name,
                budget,
                vision_only,
                frames,
                layer,
                prune_at,
                sweep,
                lookahead,
                adaptive_heads,
            ],  # fmt: skip
            [result, picture, plot],
            api_name="run",
        )
    return app


def launch(app, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **kwargs):
    """Start the app with the demo's upload limit, which Gradio enforces while the upload streams in (the check in
    load_frames sees files only after they were stored)."""
    return app.launch(server_name=host, server_port=port, share=share, max_file_size=f"{MAX_FILE_MB}mb", **kwargs)


def _port(text: str) -> int:
    """A TCP port to listen on, 1 to 65535 (0, "any free port", would leave Gradio printing a URL with port 0)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r} (a whole number from 1 to 65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range (1 to 65535)")
    return port


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vlcache demo", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    p.add_argument("--port", type=_port, default=7860, help="the port to listen on, 1 to 65535 (default 7860)")
    p.add_argument("--share", action="store_true", help="a public gradio.live link")
    p.add_argument("--models", default="embedded", help="comma-separated models visitors may pick: embedded, "
                   "tiny, hub ids or local directories (default: embedded)")  # fmt: skip
    p.add_argument("--keep-models", type=int, default=2, help="models kept loaded at once (default 2)")
    p.add_argument("--load-timeout", type=float, default=LOAD_TIMEOUT_S, help="seconds a request waits for a model "
                   f"that is loading before it is told to try again (default {LOAD_TIMEOUT_S:.0f})")  # fmt: skip
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not args.load_timeout > 0:
        raise ValueError(f"--load-timeout must be more than 0, got {args.load_timeout}")
    return args


def main(argv=None) -> int:
    from .model_source import resolve

    args = parse_args(argv)
    for name in args.models:
        if name not in MODELS:
            resolve(
                name, "--models"
            )  # a missing directory or unreachable hub fails at launch, not on a visitor's request
    runner = Runner(args.models, load_timeout=args.load_timeout, keep=args.keep_models)
    launch(build(runner), args.host, args.port, args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
