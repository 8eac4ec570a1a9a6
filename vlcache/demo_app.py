"""The Gradio demo: ask about a video (or a few images) with and without KV-cache compression, side by side.

    vlcache demo                      # http://127.0.0.1:7860, the embedded model, CPU is fine
    python demo/app.py --port 7861

Shows both answers, the KV memory each one held, prefill and decode times, and for each frame which of its patches
the policy kept (one layer, or averaged over layers and heads). A thin consumer of the public API.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MAX_FRAMES = 32
MAX_FILE_MB = 50
MODELS = ["embedded", "tiny"]


class Runner:
    """Loads models once and runs one comparison at a time (the model is shared, the session is not)."""

    def __init__(self):
        self._models: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def model(self, name: str):
        from . import pipeline

        if name not in self._models:
            self._models[name] = pipeline.load(name)
        return self._models[name]

    def compare(
        self, frames, question: str, model_name: str, policy_name: str, budget: float, vision_only: bool, layer: str
    ):
        from . import pipeline
        from .modality import layout_from_inputs
        from .policies import Full, make_policy
        from .viz import heatmap, kept_fraction

        amounts = {"vision_budget": budget} if vision_only else {"budget": budget}
        policy = make_policy(policy_name, **amounts)
        with self._lock:
            model, processor = self.model(model_name)
            question = question.strip() or pipeline.default_question(model)
            inputs = pipeline.frames_inputs(processor, frames, question, device=next(model.parameters()).device)
            width = len(frames) + 1 if pipeline.is_embedded(model) else 48
            full = pipeline.run(model, processor, inputs, Full(), width)
            small = pipeline.run(model, processor, inputs, policy, width)
            layout = layout_from_inputs(model.config, inputs)
        which = None if layer in ("", "average") else int(layer)
        if which is not None and which not in small.kept_positions:
            raise ValueError(f"layer {which} is not compressible; choose one of {sorted(small.kept_positions)}")
        picture = heatmap(frames, layout, kept_fraction(layout, small.kept_positions, which))
        return report(full, small, policy), picture


def report(full, small, policy) -> str:
    f, s = full.prefill_stats, small.prefill_stats

    def kib(n):
        return f"{n / 1024:,.1f} KiB"

    rows = [
        ("answer", f"`{full.text.strip()}`", f"`{small.text.strip()}`"),
        ("tokens kept per layer", f"{f.kept():.0f} of {f.prompt_tokens}", f"{s.kept():.0f} of {s.prompt_tokens}"),
        ("vision tokens kept", f"{f.kept('image') + f.kept('video'):.0f}", f"{s.kept('image') + s.kept('video'):.0f}"),
        ("KV cache after prefill", kib(f.kv_bytes), f"{kib(s.kv_bytes)} ({100 * (1 - s.kv_ratio):.0f}% saved)"),
        ("prefill", f"{1000 * full.prefill_s:.1f} ms", f"{1000 * small.prefill_s:.1f} ms"),
        ("decode", f"{full.decode_ms_per_token:.2f} ms/token", f"{small.decode_ms_per_token:.2f} ms/token"),
    ]
    lines = [f"| | full cache | {s.policy} |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    same = "the same answer" if full.text == small.text else "a different answer"
    return "\n".join(lines) + f"\n\nWith compression the model gave {same}."


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


def build(runner: Runner | None = None):
    import gradio as gr

    from .caption import ensure_samples
    from .policies import POLICIES

    runner = runner or Runner()
    samples = [str(p) for p in ensure_samples()]

    def run(video, images, question, model_name, policy_name, budget, vision_only, frames, layer):
        try:
            picked = load_frames(video, images, int(frames))
            return runner.compare(
                picked, question or "", model_name, policy_name, float(budget), bool(vision_only), str(layer)
            )
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
                video = gr.Video(label="video", sources=["upload"])
                images = gr.File(label="or images", file_count="multiple", file_types=["image"])
                question = gr.Textbox(label="question (empty: the model's caption question)", value="")
                with gr.Row():
                    model_name = gr.Dropdown(MODELS, value="embedded", label="model", allow_custom_value=True)
                    policy_name = gr.Dropdown([p for p in POLICIES if p != "full"], value="snapkv", label="policy")
                with gr.Row():
                    budget = gr.Slider(0.01, 1.0, value=0.25, step=0.01, label="budget (share kept)")
                    vision_only = gr.Checkbox(value=True, label="vision tokens only (keep all text)")
                with gr.Row():
                    frames = gr.Slider(1, MAX_FRAMES, value=8, step=1, label="frames")
                    layer = gr.Dropdown(
                        ["average"] + [str(i) for i in range(32)], value="average", label="heatmap layer"
                    )
                go = gr.Button("Compare", variant="primary")
            with gr.Column():
                result = gr.Markdown(label="result")
                picture = gr.Image(label="kept patches per frame (light = kept)", type="pil")
        gr.Examples([[s] for s in samples], inputs=[video], label="sample videos")
        go.click(
            run,
            [video, images, question, model_name, policy_name, budget, vision_only, frames, layer],
            [result, picture],
            api_name="run",
        )
    return app


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="vlcache demo", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="a public gradio.live link")
    args = p.parse_args(argv)
    build().launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
