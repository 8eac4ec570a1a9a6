"""What the apps make of their inputs before any model runs: sample videos that are whole or absent (and written
again where an older version cut one short), and the demo's port refused in one line at argument parsing."""

import threading

import pytest

from vlcache.apps import samples
from vlcache.apps.cli import main
from vlcache.apps.video import frame_count, read_frames

HALF_AN_MP4 = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41\x00\x00\x00\x08free"


def test_a_sample_killed_mid_write_leaves_nothing(tmp_path, monkeypatch):
    """A first run killed while writing a sample (here: its writer stops half way) leaves no sampleN.mp4 behind, so
    the next run writes it whole instead of failing on it with "cannot decode video" ever after."""

    def killed(path, frames, **kw):
        path.write_bytes(HALF_AN_MP4)
        raise KeyboardInterrupt

    monkeypatch.setattr(samples, "write_video", killed)
    with pytest.raises(KeyboardInterrupt):
        samples.ensure_samples(tmp_path, count=1)
    assert list(tmp_path.iterdir()) == []  # neither the sample nor its partial file
    monkeypatch.undo()
    (path,) = samples.ensure_samples(tmp_path, count=1)
    assert len(read_frames(path, frames=8)) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["sample0.mp4"]


def test_two_first_runs_at_once_both_get_whole_samples(tmp_path, monkeypatch):
    """A second run that starts while the first is still writing a sample neither reads the half-written file nor
    breaks the first: each writes its own and renames it into place."""
    real = samples.write_video
    writing, resume = threading.Event(), threading.Event()

    def paused_first(path, frames, **kw):
        if threading.current_thread().name == "first":
            path.write_bytes(HALF_AN_MP4)  # the first run is part-way through its file ...
            writing.set()
            assert resume.wait(30)  # ... while the second runs from start to end
        return real(path, frames, **kw)

    monkeypatch.setattr(samples, "write_video", paused_first)
    got = {}

    def first():
        (got["first"],) = samples.ensure_samples(tmp_path, count=1)

    thread = threading.Thread(target=first, name="first")
    thread.start()
    try:
        assert writing.wait(30)
        (second,) = samples.ensure_samples(tmp_path, count=1)
        assert len(read_frames(second, frames=8)) == 8
    finally:
        resume.set()
        thread.join(30)
    assert got["first"] == second and len(read_frames(second, frames=8)) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["sample0.mp4"]


def test_a_sample_truncated_by_an_older_version_is_written_again(tmp_path, monkeypatch):
    """Versions before the rename could leave a cut-short sampleN.mp4, which failed with "cannot decode video" ever
    after: a sample without its frames is written again, and a whole one is left alone (not rewritten per call)."""
    (path,) = samples.ensure_samples(tmp_path, count=1)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # what a run killed mid-write left behind
    assert frame_count(path) == 0
    (again,) = samples.ensure_samples(tmp_path, count=1)
    assert again == path and frame_count(again) == 8 and len(read_frames(again, frames=8)) == 8

    def rewrite(*a, **kw):
        raise AssertionError("a whole sample was written again")

    monkeypatch.setattr(samples, "write_video", rewrite)
    assert samples.ensure_samples(tmp_path, count=1) == [path]


def test_samples_go_to_the_folder_set_when_called(tmp_path, monkeypatch):
    """ensure_samples() reads SAMPLE_DIR when called (it was bound at import), so a caller can point it elsewhere."""
    monkeypatch.setattr(samples, "SAMPLE_DIR", tmp_path / "cache")
    (path,) = samples.ensure_samples(count=1)
    assert path == tmp_path / "cache" / "sample0.mp4" and path.stat().st_size > 0


@pytest.mark.parametrize(
    "port, message",
    [
        ("99999", "argument --port: port 99999 is out of range (1 to 65535)"),  # was Gradio's OverflowError
        ("-1", "argument --port: port -1 is out of range (1 to 65535)"),
        ("0", "argument --port: port 0 is out of range (1 to 65535)"),
        ("http", "argument --port: not a port number: 'http' (a whole number from 1 to 65535)"),
    ],
    ids=["99999", "-1", "0", "http"],
)
def test_demo_refuses_a_bad_port_in_one_line(port, message, capsys):
    from vlcache.apps.demo import parse_args

    with pytest.raises(SystemExit) as e:
        main(["demo", f"--port={port}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"vlcache demo: error: {message}" and "Traceback" not in err
    assert parse_args(["--port", "7861"]).port == 7861 and parse_args([]).port == 7860
