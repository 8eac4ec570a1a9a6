"""The Gradio demo, started on 127.0.0.1 and driven with gradio_client as a browser would drive it."""

import socket
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

from vlcache import pipeline  # noqa: E402
from vlcache.caption import ensure_samples  # noqa: E402
from vlcache.demo_app import MAX_FILE_MB, MAX_FRAMES, MAX_QUESTION_CHARS, Runner, build, launch  # noqa: E402

LOADED: list[str] = []  # every model the demo's runner was asked to load


def _recording_load(name):
    LOADED.append(name)
    return pipeline.load(name)


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
    args = dict(
        question="", model_name="embedded", policy_name="snapkv", budget=0.25, vision_only=True, layer="average"
    )
    args.update(kw)
    return client.predict(
        handle_file(str(video)) if video else None,
        [handle_file(str(p)) for p in images] if images else None,
        args["question"], args["model_name"], args["policy_name"], args["budget"], args["vision_only"], frames, args["layer"],
        api_name="/run",
    )  # fmt: skip


def test_compares_full_and_compressed_on_a_video(client):
    report, picture = _run(client, video=ensure_samples()[0])
    assert "| | full cache | snapkv(vision=0.25) |" in report
    assert "KV cache after prefill" in report and "% saved" in report
    assert "32" in report  # 25% of 128 vision tokens
    assert picture and str(picture).endswith((".webp", ".png"))


def test_images_and_a_single_layer_heatmap(client, tmp_path):
    import numpy as np

    from vlcache.evaluation.tasks import make_example

    ex = make_example("needle", 4, np.random.default_rng(0))
    paths = []
    for i, f in enumerate(ex.frames):
        paths.append(tmp_path / f"f{i}.png")
        f.save(paths[-1])
    report, _ = _run(
        client, images=paths, question="color?", policy_name="lookm", budget=0.5, vision_only=False, layer="1"
    )
    assert "lookm(budget=0.5)" in report


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(), "upload a video or some images"),
        (
            dict(video="SAMPLE", frames=MAX_FRAMES + 1),
            f"greater than maximum value {MAX_FRAMES}",
        ),  # the slider's own check
        (dict(video="SAMPLE", layer="9"), "not compressible"),
    ],
)
def test_clear_messages_for_bad_input(client, kwargs, message):
    if kwargs.get("video") == "SAMPLE":
        kwargs["video"] = ensure_samples()[0]
    with pytest.raises(Exception, match=message):
        _run(client, **kwargs)


def test_file_size_limit(client, monkeypatch):
    import vlcache.demo_app as demo

    monkeypatch.setattr(demo, "MAX_FILE_MB", 0.001)
    with pytest.raises(Exception, match=r"the demo takes files up to 0.001 MB"):
        _run(client, video=ensure_samples()[0])


@pytest.mark.parametrize("name", ["tiny", "/etc", "someone/any-repo"])
def test_a_visitor_picks_only_the_models_given_at_launch(client, name):
    """model_name took custom values: any local directory or hub repo, loaded and cached forever."""
    with pytest.raises(Exception, match="not in the list of choices|is not offered here"):
        _run(client, video=ensure_samples()[0], model_name=name)
    assert name not in LOADED


def test_a_long_question_is_refused_before_any_work(client):
    """A 100,000-character question ran for 469 s (at 1.6 GB) under the demo's lock."""
    with pytest.raises(Exception, match=f"characters; the demo takes up to {MAX_QUESTION_CHARS}"):
        _run(client, video=ensure_samples()[0], question="x" * (4 * MAX_QUESTION_CHARS))


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
    from vlcache.demo_app import main, parse_args

    assert parse_args([]).host == "127.0.0.1" and parse_args([]).models == ["embedded"]
    assert parse_args(["--models", "embedded, tiny"]).models == ["embedded", "tiny"]
    with pytest.raises(ValueError, match="no such directory"):
        main(["--models", "embedded,/nonexistent/model"])
