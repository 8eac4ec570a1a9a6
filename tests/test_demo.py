"""The Gradio demo, started on 127.0.0.1 and driven with gradio_client as a browser would drive it."""

import socket

import pytest

gr = pytest.importorskip("gradio")
from gradio_client import Client, handle_file  # noqa: E402

from vlcache.caption import ensure_samples  # noqa: E402
from vlcache.demo_app import MAX_FRAMES, build  # noqa: E402


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    app.close()


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
