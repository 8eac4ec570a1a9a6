"""`vlcache caption` as a user runs it: JSONL records, resume, bad videos, folders and lists, batching, and
sharding under `accelerate launch` with two CPU processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlcache.caption import ensure_samples, main
from vlcache.video import VideoError, read_frames, sample_indices, write_video

FIELDS = {"path", "status", "caption", "frames", "tokens_before", "tokens_after", "kv_bytes_kept", "kv_bytes_saved",
          "prefill_s", "decode_s", "policy", "model"}  # fmt: skip


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videos")
    paths = ensure_samples(folder, count=3)
    return folder, paths


def _records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_captions_videos_into_jsonl(videos, tmp_path, capsys):
    folder, paths = videos
    out = tmp_path / "c.jsonl"
    assert main([str(p) for p in paths] + ["-o", str(out), "--vision-budget", "0.25", "--compare"]) == 0
    recs = _records(out)
    assert [r["path"] for r in recs] == [str(p) for p in paths]
    for r in recs:
        assert FIELDS <= set(r) and r["status"] == "ok" and r["frames"] == 8
        assert r["tokens_after"] < r["tokens_before"] and r["kv_bytes_saved"] > 0
        assert r["caption"].startswith("=") and "caption_full" in r
    printed = capsys.readouterr().out
    assert "done 3, skipped 0" in printed and "failed 0" in printed


def test_resume_skips_finished_videos(videos, tmp_path, capsys):
    folder, paths = videos
    out = tmp_path / "c.jsonl"
    assert main([str(paths[0]), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main([str(folder), "-o", str(out)]) == 0
    assert "done 3, skipped 1" in capsys.readouterr().out
    assert sorted(r["path"] for r in _records(out)) == sorted(str(p) for p in paths)  # one record per video
    assert main([str(folder), "-o", str(out), "--no-resume"]) == 0
    assert len(_records(out)) == 3


def test_bad_videos_get_error_records_and_the_run_goes_on(videos, tmp_path, capsys):
    folder, paths = videos
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(os.urandom(3000))
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    zero = tmp_path / "zero.mkv"  # a valid header, no frames
    import av

    with av.open(str(zero), "w") as c:
        stream = c.add_stream("libx264", rate=4)
        stream.width = stream.height = 64
        c.start_encoding()
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{paths[0]}\n{corrupt}\nmissing.mp4\n{empty}\n{zero}\n")
    out = tmp_path / "c.jsonl"
    assert main([str(listing), "-o", str(out)]) == 1  # some failed
    recs = {Path(r["path"]).name: r for r in _records(out)}
    assert recs[paths[0].name]["status"] == "ok"
    assert "cannot decode video" in recs["corrupt.mp4"]["error"]
    assert "file not found" in recs["missing.mp4"]["error"]
    assert "empty file" in recs["empty.mp4"]["error"]
    assert recs["zero.mkv"]["status"] == "error" and (
        "no frames" in recs["zero.mkv"]["error"] or "cannot decode" in recs["zero.mkv"]["error"]
    )
    assert "failed 4" in capsys.readouterr().out


def test_batched_captions_equal_one_at_a_time(videos, tmp_path):
    folder, paths = videos
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    assert main([str(folder), "-o", str(one), "--budget", "0.3"]) == 0
    assert main([str(folder), "-o", str(many), "--budget", "0.3", "--batch", "3"]) == 0
    assert [r["caption"] for r in _records(one)] == [r["caption"] for r in _records(many)]
    assert all(r["batch"] == 3 for r in _records(many))


def test_policy_settings_reach_the_records(videos, tmp_path):
    folder, _ = videos
    out = tmp_path / "c.jsonl"
    assert main([str(folder), "-o", str(out), "--policy", "h2o", "--budget", "0.3", "--set", "evict_every=4"]) == 0
    assert all(r["policy"] == "h2o" and r["settings"] == {"evict_every": 4} for r in _records(out))


def test_user_mistakes_are_one_line(tmp_path):
    from vlcache.cli import main as cli

    proc = subprocess.run(
        [sys.executable, "-m", "vlcache", "caption", "x.mp4", "--budget", "2.0", "-o", str(tmp_path / "o.jsonl")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("vlcache: error: budget=2.0 is out of range")
    assert "Traceback" not in proc.stderr
    assert cli(["policies"]) == 0


def test_sharded_over_two_processes_with_accelerate(videos, tmp_path):
    folder, paths = videos
    out = tmp_path / "c.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vlcache.caption", str(folder), "-o", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(out)
    assert sorted(r["path"] for r in recs) == sorted(str(p) for p in paths)  # merged, no duplicates
    assert not list(tmp_path.glob("c.jsonl.shard*"))  # shards folded in


def test_frame_sampling_and_round_trip(tmp_path):
    assert sample_indices(100, 25.0, frames=4) == [0, 33, 66, 99]
    assert sample_indices(100, 25.0, target_fps=5, cap=64) == list(range(0, 100, 5))
    assert len(sample_indices(1000, 25.0, target_fps=25, cap=16)) == 16
    with pytest.raises(VideoError, match="no frames"):
        sample_indices(0, 25.0, frames=4)
    import numpy as np
    from PIL import Image

    from vlcache.evaluation.tasks import make_example

    frames = [f.resize((32, 32), Image.NEAREST) for f in make_example("describe", 6, np.random.default_rng(1)).frames]
    back = read_frames(write_video(tmp_path / "v.mp4", frames, exact_rgb=True), frames=6)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back, frames))  # lossless
    # browser-friendly yuv420p: the pixel the embedded processor samples from each 8x8 block stays within a few levels
    small = make_example("describe", 4, np.random.default_rng(0)).frames
    big = [f.resize((128, 128), Image.NEAREST) for f in small]
    got = read_frames(write_video(tmp_path / "b.mp4", big), frames=4)
    err = max(np.abs(np.asarray(g, int)[4::8, 4::8] - np.asarray(f, int)).max() for g, f in zip(got, small))
    assert err <= 4


@pytest.mark.parametrize("width", [8, 16, 48])
def test_narrow_h264_videos_are_read_with_pyav(tmp_path, width):
    """decord fails on H.264 frames 8-48 pixels wide ('from_size == to_size'); PyAV reads them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(width)
    frames = [Image.fromarray(rng.integers(0, 255, (width, width, 3), dtype=np.uint8)) for _ in range(6)]
    got = read_frames(write_video(tmp_path / "v.mp4", frames, exact_rgb=True), frames=3)
    assert [np.asarray(g).tolist() for g in got] == [np.asarray(frames[i]).tolist() for i in (0, 2, 5)]


def test_an_animated_gif_is_read_as_a_video(tmp_path):
    """It was read as one image (its first frame)."""
    from PIL import Image

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255)]
    frames = [Image.new("RGB", (16, 16), c) for c in colours]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=250, loop=0)
    got = read_frames(tmp_path / "a.gif", frames=3)
    assert [g.getpixel((8, 8)) for g in got] == [colours[0], colours[2], colours[5]]
    assert len(read_frames(tmp_path / "a.gif", frames=None, target_fps=2.0)) == 3  # 4 fps played at 2
    frames[0].save(tmp_path / "still.gif")
    assert len(read_frames(tmp_path / "still.gif", frames=8)) == 1
