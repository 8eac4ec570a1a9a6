"""The Gradio demo, started on 127.0.0.1 and driven with gradio_client as a browser would drive it."""

import socket
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

from vlcache.apps import model_loading, prompts, timed_run  # noqa: E402
from vlcache.apps.demo import (  # noqa: E402
    DEFAULT_ADAPTIVE_HEADS,
    DEFAULT_BUDGET,
    DEFAULT_LOOKAHEAD,
    DEFAULT_POLICY,
    DEFAULT_PRUNE_AT,
    MAX_FILE_MB,
    MAX_FRAMES,
    MAX_QUESTION_CHARS,
    SWEEP_BUDGETS,
    Runner,
    agreement,
    build,
    launch,
)
from vlcache.apps.samples import ensure_samples  # noqa: E402

LOADED: list[str] = []  # every model the demo's runner was asked to load


def _recording_load(name):
    LOADED.append(name)
    return model_loading.load(name)


@pytest.fixture(scope="module")
def served():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build(Runner(["embedded"], loader=_recording_load))
    launch(app, port=port, prevent_thread_lock=True, quiet=True)
    yield app, f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served[1], verbose=False)


def _run(client, video=None, images=None, frames=8, **kw):
    """The page's /run with the page's defaults unless given: (report, kept-patch picture, sweep plot)."""
    args = dict(
        question="", model_name="embedded", policy_name=DEFAULT_POLICY, budget=DEFAULT_BUDGET, vision_only=True,
        layer="average", prune_at=DEFAULT_PRUNE_AT, sweep=True, lookahead=DEFAULT_LOOKAHEAD,
        adaptive_heads=DEFAULT_ADAPTIVE_HEADS,
    )  # fmt: skip
    args.update(kw)
    return client.predict(
        handle_file(str(video)) if video else None,
        [handle_file(str(p)) for p in images] if images else None,
        args["question"], args["model_name"], args["policy_name"], args["budget"], args["vision_only"], frames,
        args["layer"], args["prune_at"], args["sweep"], args["lookahead"], args["adaptive_heads"],
        api_name="/run",
    )  # fmt: skip


@pytest.mark.slow
def test_compares_full_and_compressed_on_a_video(client):
    """The page's defaults on a sample video: the compressed answer is the full cache's, and both pictures come."""
    from PIL import Image

    from vlcache.apps.viz import CELL

    report, picture, plot = _run(client, video=ensure_samples()[0])
    assert "| | full cache | vlcache(vision=0.1, head_budgets=adaptive, lookahead=1) |" in report
    assert "KV cache after prefill" in report and "% saved" in report
    assert "| vision tokens kept | 128 | 12 |" in report  # 10% of 128 vision tokens, rounded down
    assert "| agreement with the full cache | 100% | 100% of tokens |" in report
    assert "With compression the model gave the same answer." in report
    with Image.open(picture) as im:  # 8 frames, 4 a row, at CELL px each
        assert im.width >= 4 * CELL and im.height >= 2 * CELL
    with Image.open(plot) as im:
        assert im.width >= 400 and im.height >= 200


@pytest.mark.slow
def test_images_and_a_single_layer_heatmap(client, tmp_path):
    import numpy as np

    from vlcache.apps.evaluation.tasks import make_example

    ex = make_example("needle", 4, np.random.default_rng(0))
    paths = []
    for i, f in enumerate(ex.frames):
        paths.append(tmp_path / f"f{i}.png")
        f.save(paths[-1])
    report, _, plot = _run(
        client, images=paths, question="color?", policy_name="lookm", budget=0.5, vision_only=False, layer="1",
        prune_at="off", sweep=False, adaptive_heads=False,
    )  # fmt: skip
    assert "lookm(budget=0.5)" in report and plot is None  # LOOK-M does not look ahead: the page's lookahead is off


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(), "upload a video or some images"),
        (
            dict(video="SAMPLE", frames=MAX_FRAMES + 1),
            f"greater than maximum value {MAX_FRAMES}",
        ),  # the slider's own check
        (dict(video="SAMPLE", layer="9"), "not compressible"),
        (dict(video="SAMPLE", prune_at="9", lookahead="off"), "prune_at"),  # the embedded model has 4 layers
    ],
)
def test_clear_messages_for_bad_input(client, kwargs, message):
    if kwargs.get("video") == "SAMPLE":
        kwargs["video"] = ensure_samples()[0]
    with pytest.raises(Exception, match=message):
        _run(client, **kwargs)


@pytest.mark.slow
def test_file_size_limit(client, monkeypatch):
    import vlcache.apps.demo as demo

    monkeypatch.setattr(demo, "MAX_FILE_MB", 0.001)
    with pytest.raises(Exception, match=r"the demo takes files up to 0.001 MB"):
        _run(client, video=ensure_samples()[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "/etc", "someone/any-repo"])
def test_a_visitor_picks_only_the_models_given_at_launch(client, name):
    """model_name took custom values: any local directory or hub repo, loaded and cached forever."""
    with pytest.raises(Exception, match="not in the list of choices|is not offered here"):
        _run(client, video=ensure_samples()[0], model_name=name)
    assert name not in LOADED


@pytest.mark.slow
def test_a_long_question_is_refused_before_any_work(client, monkeypatch):
    """A 100,000-character question ran for 469 s (at 1.6 GB) under the demo's lock: now no frame is decoded and
    no model asked for (the server runs in this process, so the patched functions are the ones it calls)."""
    import vlcache.apps.demo as demo

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the question was checked")

    monkeypatch.setattr(demo, "load_frames", no_work)
    monkeypatch.setattr(demo.Runner, "model", no_work)
    with pytest.raises(Exception, match=f"characters; the demo takes up to {MAX_QUESTION_CHARS}"):
        _run(client, video=ensure_samples()[0], question="x" * (4 * MAX_QUESTION_CHARS))


@pytest.mark.slow
def test_an_upload_over_the_limit_is_refused_before_it_is_stored(served):
    """A 300 MB POST to the upload route was stored before the 50 MB check."""
    import httpx

    app, url = served
    folder = Path(app.server_app.uploaded_file_dir)
    before = {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()
    big = b"\0" * ((MAX_FILE_MB + 1) << 20)
    response = httpx.post(url + "gradio_api/upload", files={"files": ("big.mp4", big)}, timeout=60)
    assert response.status_code == 413, response.text[:200]
    after = {p for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()
    assert not [p for p in after - before if p.stat().st_size > MAX_FILE_MB << 20]


def test_a_slow_load_blocks_nobody_else():
    """Loading held one global lock: a bad hub id kept another visitor waiting 139 s."""
    import threading
    import time

    release = threading.Event()

    def load(name):
        if name == "slow":
            release.wait(30)
        return name, None

    runner = Runner(["slow", "fast"], load_timeout=0.5, loader=load)
    started = time.time()
    with pytest.raises(ValueError, match="'slow' is still loading; try again"):
        runner.model("slow")
    assert runner.model("fast") == ("fast", None) and time.time() - started < 5
    release.set()
    assert runner.model("slow") == ("slow", None)  # the same load, finished in the background


def test_models_beyond_keep_are_let_go_and_failed_loads_retried():
    calls = []

    def load(name):
        calls.append(name)
        if name == "bad" and calls.count("bad") == 1:
            raise OSError("the hub is unreachable\nand more detail")
        return name, None

    runner = Runner(["a", "b", "bad"], keep=1, loader=load)
    runner.model("a"), runner.model("b"), runner.model("a")
    assert calls == ["a", "b", "a"]  # a was let go when b loaded, so it loaded again
    with pytest.raises(ValueError, match="cannot load model 'bad': the hub is unreachable$"):
        runner.model("bad")
    assert runner.model("bad") == ("bad", None)


def test_it_listens_on_localhost_by_default_and_checks_its_models_at_launch():
    from vlcache.apps.demo import main, parse_args

    assert parse_args([]).host == "127.0.0.1" and parse_args([]).models == ["embedded"]
    assert parse_args(["--models", "embedded, tiny"]).models == ["embedded", "tiny"]
    with pytest.raises(ValueError, match="no such directory"):
        main(["--models", "embedded,/nonexistent/model"])


@pytest.fixture(scope="module")
def embedded():
    return model_loading.load("embedded")


def _sample_inputs(embedded, frames):
    model, processor = embedded
    return prompts.frames_inputs(processor, frames, "describe?")


def test_kept_patches_are_outlined_over_the_real_frame(embedded):
    """The picture was a light/dark mask over 70-px thumbnails titled "image N": now each frame is drawn as it is,
    at CELL px, and only the patches some cache kept carry the outline colour."""
    import numpy as np
    import torch

    from vlcache.apps.evaluation.tasks import make_example
    from vlcache.apps.viz import CELL, GAP, OUTLINE, TITLE_PX, heatmap, kept_fraction
    from vlcache.modality import layout_from_inputs

    model, _ = embedded
    frames = make_example("describe", 2, np.random.default_rng(1)).frames
    inputs = _sample_inputs(embedded, frames)
    layout = layout_from_inputs(model.config, inputs)
    span = layout.samples[0].spans[1]  # frame 1; 16 patches on a 4 x 4 grid
    kept = {0: torch.tensor([[[span.start + 0, span.start + 5], [span.start + 0, span.start + 6]]])}  # [B, Hk, K]
    fraction = kept_fraction(layout, kept)
    assert fraction[span.start] == 1.0 and fraction[span.start + 5] == 0.5 and fraction.sum() == 2.0
    picture = np.asarray(heatmap(frames, layout, fraction, label="frame"))
    patch = CELL // 4
    x0, y0 = GAP + CELL + GAP, GAP + TITLE_PX  # frame 1's tile, right of frame 0's
    tile = picture[y0 : y0 + CELL, x0 : x0 + CELL]
    source = np.asarray(frames[1].convert("RGB").resize((CELL, CELL), 0))
    outlined = (tile == OUTLINE).all(-1)
    for k in range(16):
        r, c = divmod(k, 4)
        box = (slice(r * patch, (r + 1) * patch), slice(c * patch, (c + 1) * patch))
        inner = (slice(r * patch + 8, (r + 1) * patch - 8), slice(c * patch + 8, (c + 1) * patch - 8))
        assert (tile[inner] == source[inner]).all(), k  # the frame itself shows inside every patch, kept or not
        assert outlined[box].any() == (k in (0, 5, 6)), k
        if k not in (0, 5, 6):
            assert (tile[box] == source[box]).all(), k  # an evicted patch is left exactly as it is
    assert outlined[:patch, :patch].sum() > outlined[patch : 2 * patch, patch : 2 * patch].sum()  # 1.0 > 0.5
    left = picture[y0 : y0 + CELL, GAP : GAP + CELL]
    assert not (left == OUTLINE).all(-1).any()  # frame 0: nothing kept, nothing outlined


def test_heatmap_titles_and_tile_sizes(embedded):
    import numpy as np

    from vlcache.apps.evaluation.tasks import make_example
    from vlcache.apps.viz import CELL, heatmap, patch_grid, titles
    from vlcache.modality import layout_from_inputs

    model, _ = embedded
    frames = [f.resize((64, 32)) for f in make_example("describe", 6, np.random.default_rng(2)).frames]
    layout = layout_from_inputs(model.config, _sample_inputs(embedded, frames))
    fraction = np.zeros(layout.length)
    fraction[layout.samples[0].spans[2].start] = 1.0  # one of frame 2's 16 patches
    assert titles(layout, fraction, label="frame")[:3] == ["frame 0: 0% kept", "frame 1: 0% kept", "frame 2: 6% kept"]
    assert titles(layout, fraction)[0] == "image 0: 0% kept"  # uploaded images keep their name
    picture = heatmap(frames, layout, fraction)
    assert picture.width >= 4 * 2 * CELL and picture.height >= 2 * CELL  # 6 wide frames: 4 a row, 2 rows
    assert patch_grid(16) == (4, 4) and patch_grid(8, aspect=2.0) == (2, 4) and patch_grid(7) == (1, 7)


def test_agreement_counts_positions_against_the_full_answer():
    assert agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert agreement([1, 9, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert agreement([1, 2], [1, 2, 3, 4]) == 0.5  # stopped early: the missing tokens disagree
    assert agreement([], []) == 0.0  # no answer at all: defined, not a division by zero


@pytest.mark.slow  # seven compressed runs of the embedded model; the full suite runs it
def test_the_budget_sweep_measures_each_budget(embedded):
    """At the page's default budget the sweep gives what the comparison gives; a policy that keeps a random 1% of
    the vision tokens does not give the full cache's answer, so the sweep can show a loss."""
    from vlcache.apps.demo import _policy_maker, budget_sweep
    from vlcache.apps.video import read_frames
    from vlcache.policies import Full

    model, processor = embedded
    inputs = _sample_inputs(embedded, read_frames(ensure_samples()[0]))
    width = prompts.answer_tokens(model)
    full = timed_run.run(model, processor, inputs, Full(), width)
    make = _policy_maker(DEFAULT_POLICY, True, DEFAULT_PRUNE_AT, DEFAULT_LOOKAHEAD, DEFAULT_ADAPTIVE_HEADS)
    swept = budget_sweep(model, processor, inputs, make, full.tokens, width)
    assert len(swept) == len(SWEEP_BUDGETS) and all(0 <= a <= 1 for a in swept)
    small = timed_run.run(model, processor, inputs, make(DEFAULT_BUDGET), width)
    assert swept[SWEEP_BUDGETS.index(DEFAULT_BUDGET)] == agreement(small.tokens, full.tokens) == 1.0
    random = budget_sweep(model, processor, inputs, _policy_maker("random", True, "off"), full.tokens, width, (0.01,))
    assert random[0] < 1.0


def test_a_single_layer_picture_outlines_what_that_layer_kept(embedded):
    """The page's layer choice: "1" draws what layer 1's caches kept, "average" the share over every layer; each
    is the picture of the run's own kept positions (the page's run and this one are the same greedy LOOK-M run)."""
    import numpy as np
    import torch

    from vlcache.apps.evaluation.tasks import make_example
    from vlcache.apps.viz import heatmap, kept_fraction
    from vlcache.modality import layout_from_inputs
    from vlcache.policies import LOOKM

    model, processor = embedded
    frames = make_example("needle", 4, np.random.default_rng(0)).frames
    runner = Runner(["embedded"], loader=lambda name: embedded)
    args = ("color?", "embedded", "lookm", 0.5, False)
    _, one, _ = runner.compare(frames, *args, "1", sweep=False, label="image")
    _, average, _ = runner.compare(frames, *args, "average", sweep=False, label="image")
    inputs = prompts.frames_inputs(processor, frames, "color?")
    kept = timed_run.run(model, processor, inputs, LOOKM(budget=0.5), prompts.answer_tokens(model, 48)).kept_positions
    layout = layout_from_inputs(model.config, inputs)
    # the layers kept different patches, or the two pictures could not tell a wrong layer from the right one
    assert not np.array_equal(kept_fraction(layout, kept, 1), kept_fraction(layout, kept, 0))
    assert not np.array_equal(kept_fraction(layout, kept, 1), kept_fraction(layout, kept))
    for picture, layer in ((one, 1), (average, None)):
        expected = heatmap(frames, layout, kept_fraction(layout, kept, layer), label="image")
        assert np.array_equal(np.asarray(picture), np.asarray(expected)), layer
    # kept_fraction itself: one layer's share counts that layer's heads only
    two = {0: torch.tensor([[[3, 4]]]), 1: torch.tensor([[[4, 5]]])}
    assert kept_fraction(layout, two, 1)[[3, 4, 5]].tolist() == [0.0, 1.0, 1.0]
    assert kept_fraction(layout, two)[[3, 4, 5]].tolist() == [0.5, 1.0, 0.5]
