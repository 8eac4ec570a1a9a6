"""`vlcache caption` as a user runs it: JSONL records, resume, bad videos, folders and lists, batching, and
sharding under `accelerate launch` with two CPU processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlcache.apps.caption import main
from vlcache.apps.samples import ensure_samples
from vlcache.apps.video import VideoError, read_frames, sample_indices, write_video

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
    assert "captioned 3, skipped 0" in printed and "failed 0" in printed


def test_a_caption_of_fewer_frames_is_not_cut_short(videos, tmp_path):
    """The embedded model got frames + 1 new tokens: at 4 frames its 8-place colour list stopped after 4."""
    out = tmp_path / "c.jsonl"
    assert main([str(videos[1][0]), "-o", str(out), "--frames", "4", "--compare"]) == 0
    (rec,) = _records(out)
    assert rec["frames"] == 4 and len(rec["caption_full"]) == 9 and len(rec["caption"]) == 9


def test_resume_skips_finished_videos(videos, tmp_path, capsys):
    folder, paths = videos
    out = tmp_path / "c.jsonl"
    assert main([str(paths[0]), "-o", str(out)]) == 0
    capsys.readouterr()
    assert main([str(folder), "-o", str(out)]) == 0
    assert "captioned 2, skipped 1" in capsys.readouterr().out
    assert sorted(r["path"] for r in _records(out)) == sorted(str(p) for p in paths)  # one record per video
    capsys.readouterr()
    assert main([str(folder), "-o", str(out), "--no-resume"]) == 0  # it was ignored: everything skipped
    assert "captioned 3, skipped 0" in capsys.readouterr().out and len(_records(out)) == 3


def test_resume_knows_a_video_by_its_file_and_version(videos, tmp_path, capsys, monkeypatch):
    """Resume matched the path as typed: `v.mp4` typed in another folder, a different video, was skipped and shown
    with the first one's caption; the same video typed as an absolute path was captioned again (two records); a
    video replaced at its path kept its stale caption."""
    import shutil

    folder, paths = videos
    out = tmp_path / "c.jsonl"
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    shutil.copy(paths[0], a / "v.mp4")
    shutil.copy(paths[1], b / "v.mp4")
    monkeypatch.chdir(a)
    assert main(["v.mp4", "-o", str(out)]) == 0
    (first,) = _records(out)
    monkeypatch.chdir(b)
    capsys.readouterr()
    assert main(["v.mp4", "-o", str(out)]) == 0
    assert "captioned 1, skipped 0" in capsys.readouterr().out  # another file: captioned, not skipped
    by_file = {r["file"]: r["caption"] for r in _records(out)}
    assert by_file[str(a / "v.mp4")] == first["caption"] != by_file[str(b / "v.mp4")]
    assert main([str(b / "v.mp4"), "v.mp4", "-o", str(out)]) == 0  # the same file typed twice, both done
    assert "captioned 0, skipped 1" in capsys.readouterr().out and len(_records(out)) == 2
    shutil.copy(paths[0], b / "v.mp4")  # replaced in place: another version of that file
    os.utime(b / "v.mp4", ns=(1, 1))
    assert main(["v.mp4", "-o", str(out)]) == 0
    assert "captioned 1, skipped 0" in capsys.readouterr().out
    recs = _records(out)
    assert len(recs) == 2 and {r["file"]: r["caption"] for r in recs}[str(b / "v.mp4")] == first["caption"]


def test_a_merge_keeps_a_success_over_a_later_error(tmp_path):
    """A video that was captioned and then failed in a later run (its file gone, say) keeps its caption."""
    from vlcache.apps import record_file

    out = tmp_path / "c.jsonl"
    ok = {"path": "v.mp4", "file": "/x/v.mp4", "status": "ok", "caption": "=r", "config": {"policy": "snapkv"}}
    bad = {"path": "v.mp4", "file": "/x/v.mp4", "status": "error", "error": "gone", "config": {"policy": "snapkv"}}
    other = dict(bad, config={"policy": "h2o"})  # another configuration: its own record
    out.write_text("".join(json.dumps(r) + "\n" for r in (ok, bad, other)))
    assert record_file.merge(out) == [ok, other] and _records(out) == [ok, other]


def test_every_record_is_made_durable_before_the_next_video(videos, tmp_path, monkeypatch):
    """Each record is fsynced as it is appended, before the next video is read: a crash loses at most the video
    in progress."""
    from vlcache.apps import caption, record_file

    folder, paths = videos
    events = []
    real_fsync, real_read = record_file.os.fsync, caption.read_frames
    monkeypatch.setattr(record_file.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(caption, "read_frames", lambda *a, **k: (events.append("read"), real_read(*a, **k))[1])
    assert main([str(folder), "-o", str(tmp_path / "c.jsonl")]) == 0
    reads = [i for i, e in enumerate(events) if e == "read"]
    assert len(reads) == 3 and all("fsync" in events[i:j] for i, j in zip(reads, reads[1:] + [len(events)]))


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
    from vlcache.apps.cli import main as cli

    proc = subprocess.run(
        [sys.executable, "-m", "vlcache", "caption", "x.mp4", "--budget", "2.0", "-o", str(tmp_path / "o.jsonl")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("vlcache: error: budget=2.0 is out of range")
    assert "Traceback" not in proc.stderr
    assert cli(["policies"]) == 0


@pytest.mark.slow
def test_sharded_over_two_processes(videos, tmp_path):
    """Two ranks under torchrun each caption a disjoint, non-empty share (before, on a CPU machine both took
    themselves for rank 0 of 1 and captioned everything; and `accelerate launch --cpu --num_processes 2`, this
    test's old command, starts one process)."""
    folder, paths = videos
    out = tmp_path / "c.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "vlcache.apps.caption",
           str(folder), "-o", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = _records(out)
    assert sorted(r["path"] for r in recs) == sorted(str(p) for p in paths)  # merged, one record per video
    shares = {rank: {r["path"] for r in recs if r["rank"] == rank} for rank in (0, 1)}
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert not list(tmp_path.glob("c.jsonl.shard*"))  # shards folded in
    assert "captioned 3, skipped 0" in proc.stdout


def test_frame_sampling_and_round_trip(tmp_path):
    assert sample_indices(100, 25.0, frames=4) == [0, 33, 66, 99]
    assert sample_indices(100, 25.0, target_fps=5, cap=64) == list(range(0, 100, 5))
    assert len(sample_indices(1000, 25.0, target_fps=25, cap=16)) == 16
    with pytest.raises(VideoError, match="no frames"):
        sample_indices(0, 25.0, frames=4)
    import numpy as np
    from PIL import Image

    from vlcache.apps.evaluation.tasks import make_example

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


def _caption_process(*args):
    cmd = [sys.executable, "-m", "vlcache", "caption", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_runs_writing_one_output_lose_nothing(tmp_path):
    """`caption DIR30 -o o.jsonl & caption DIR5 -o o.jsonl`: the 30-video run lost 25 records (the other run's
    merge replaced the file it was appending to). Now the second is refused while the first holds the output.
    (16 and 4 videos here: enough for the runs to overlap.)"""
    many = ensure_samples(tmp_path / "many", count=16)
    few = ensure_samples(tmp_path / "few", count=4)
    out = tmp_path / "o.jsonl"
    a = _caption_process(tmp_path / "many", "-o", out)
    b = _caption_process(tmp_path / "few", "-o", out)
    (_, a_err), (_, b_err) = a.communicate(timeout=300), b.communicate(timeout=300)
    assert a.returncode in (0, 2) and b.returncode in (0, 2), a_err[-2000:] + b_err[-2000:]
    for proc, err in ((a, a_err), (b, b_err)):
        if proc.returncode == 2:
            assert err.strip().splitlines()[-1].startswith("vlcache: error: ") and "another vlcache caption" in err
    recs = _records(out)
    want = [str(p) for proc, group in ((a, many), (b, few)) if proc.returncode == 0 for p in group]
    assert want and sorted(r["path"] for r in recs) == sorted(want)  # every finished video once, nothing lost
    assert all(r["status"] == "ok" for r in recs)


def test_a_busy_output_is_refused_in_one_line(videos, tmp_path, capsys):
    from vlcache.apps import record_file
    from vlcache.apps.cli import main as cli

    out = tmp_path / "o.jsonl"
    with record_file.locked(out):  # another run holds it
        assert cli(["caption", str(videos[1][0]), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "o.jsonl is being written by another vlcache caption run" in err and err.count("\n") == 1
    assert not out.exists()
    assert cli(["caption", str(videos[1][0]), "-o", str(out)]) == 0  # released: the next run goes ahead


def test_a_torn_last_line_is_set_aside_and_its_video_redone(videos, tmp_path, capsys):
    """27 whole lines and half of the 28th (a crash or a full disk mid-write): the rerun glued its first record to
    the half line, the merge dropped both, and one video vanished with exit status 0."""
    folder, paths = videos
    out = tmp_path / "c.jsonl"
    assert main([str(folder), "-o", str(out)]) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # one whole record, half of the next
    capsys.readouterr()
    assert main([str(folder), "-o", str(out)]) == 0
    assert "captioned 2, skipped 1" in capsys.readouterr().out
    recs = _records(out)  # every line parses
    assert sorted(r["path"] for r in recs) == sorted(str(p) for p in paths) and all(r["status"] == "ok" for r in recs)
    assert (tmp_path / "c.jsonl.torn").read_text() == lines[1][: len(lines[1]) // 2] + "\n"  # kept, not lost


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_what_was_written(videos, tmp_path, capsys, monkeypatch):
    import errno

    from vlcache.apps import record_file
    from vlcache.apps.cli import main as cli

    folder, paths = videos
    out = tmp_path / "c.jsonl"
    real, calls = record_file._write_all, []

    def fills_up(fd, data):
        calls.append(fd)
        if len(calls) == 2:  # the second record: half of it lands, then the disk is full
            real(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(record_file, "_write_all", fills_up)
    assert cli(["caption", str(folder), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("vlcache: error: cannot write") and "No space left on device" in err
    assert "the 1 records this run wrote are kept" in err
    assert len(_records(out)) == 1  # the half-written record was cut off again: no torn line
    monkeypatch.setattr(record_file, "_write_all", real)
    assert cli(["caption", str(folder), "-o", str(out)]) == 0
    assert sorted(r["path"] for r in _records(out)) == sorted(str(p) for p in paths)


@pytest.mark.slow  # six captioning runs over the sample videos (14 s); the full suite runs it
def test_resume_keys_on_the_whole_configuration(videos, tmp_path, capsys):
    """A rerun with another --policy into the same file skipped everything and printed the old records under the
    new policy's header."""
    folder, paths = videos
    out = tmp_path / "c.jsonl"
    assert main([str(folder), "-o", str(out), "--policy", "snapkv", "--budget", "0.3"]) == 0
    capsys.readouterr()
    assert main([str(folder), "-o", str(out), "--policy", "h2o", "--budget", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "policy h2o(budget=0.3)" in printed and "captioned 3, skipped 0" in printed
    assert main([str(folder), "-o", str(out), "--policy", "h2o", "--budget", "0.3", "--frames", "4"]) == 0
    assert "captioned 3, skipped 0" in capsys.readouterr().out
    assert main([str(folder), "-o", str(out), "--policy", "h2o", "--budget", "0.3"]) == 0
    assert "captioned 0, skipped 3" in capsys.readouterr().out
    recs = _records(out)
    assert len(recs) == 9  # one per video and configuration
    assert {(r["policy"], r["frames"]) for r in recs} == {("snapkv", 8), ("h2o", 8), ("h2o", 4)}


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--fps", "0"], "--fps must be more than 0, got 0.0"),
        (["--fps", "-1"], "--fps must be more than 0, got -1.0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["--frames", "0"], "--frames must be at least 1, got 0"),
        (["--frames", "4", "--fps", "1"], "--frames and --fps both given"),
        (["--set", "recent=abc", "--policy", "h2o"], "recent takes a number"),
        (["--kv-memory", "8XB"], "--kv-memory '8XB': not a size"),
        (["--kv-memory", "0"], "--kv-memory '0': must be at least one byte"),
        (["--kv-memory=-2GB"], "--kv-memory '-2GB': must be at least one byte"),
        (["-o", "FILE/o.jsonl"], "cannot write FILE/o.jsonl"),
    ],
)
def test_bad_arguments_are_one_line(videos, tmp_path, capsys, flags, message):
    """--fps 0 was a ZeroDivisionError, --set recent=abc a TypeError, an unwritable -o an OSError, all tracebacks;
    --fps -1 and --max-new-tokens 0 were accepted."""
    from vlcache.apps.cli import main as cli

    (tmp_path / "FILE").write_text("a file, so nothing can be made under it")
    flags = [str(tmp_path / f) if f.startswith("FILE") else f for f in flags]
    argv = ["caption", str(videos[1][0]), *(["-o", str(tmp_path / "o.jsonl")] if "-o" not in flags else []), *flags]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlcache: error: ") and err.count("\n") == 1
    assert message.replace("FILE", str(tmp_path / "FILE")) in err


@pytest.mark.slow
def test_kv_memory_packs_batches_within_the_bound_with_the_captions_of_one_at_a_time(tmp_path, capsys):
    from vlcache.apps import kv_memory, model_loading, prompts, timed_run
    from vlcache.policies import SnapKV, VLCache

    folder = tmp_path / "v"
    ensure_samples(folder, count=5)
    paths = sorted(folder.iterdir())
    flags = ["--policy", "snapkv", "--budget", "0.3"]
    one = tmp_path / "one.jsonl"
    assert main([str(folder), "-o", str(one), *flags]) == 0
    # what one video needs, measured as the captioner measures it: the first video alone, through the public API
    model, processor = model_loading.load("embedded")
    inputs = prompts.frames_inputs(processor, read_frames(paths[0], frames=8), "describe?")
    stats = timed_run.run(model, processor, inputs, SnapKV(budget=0.3), 9).prefill_stats
    need = kv_memory.per_video_bytes(stats, 9, SnapKV(budget=0.3), compare=False)
    assert stats.kv_bytes < need < stats.kv_bytes_full  # compressed layer by layer: less than a whole cache
    vl = timed_run.run(model, processor, inputs, VLCache(vision_budget=0.25), 9).prefill_stats
    assert kv_memory.per_video_bytes(vl, 9, VLCache(vision_budget=0.25), False) > vl.kv_bytes_full  # whole until
    # every layer has seen the prompt
    for bound, batches in ((2 * need, [1, 2, 2, 2, 2]), (100 * need, [1, 4, 4, 4, 4]), (need - 1, [1] * 5)):
        out = tmp_path / f"kv{bound}.jsonl"
        capsys.readouterr()
        assert main([str(folder), "-o", str(out), *flags, "--kv-memory", str(bound)]) == 0
        recs = _records(out)
        assert [r["batch"] for r in recs] == batches
        assert [r["caption"] for r in recs] == [r["caption"] for r in _records(one)]  # batched = alone
        printed = capsys.readouterr()
        assert "videos/hour" in printed.out
        assert ("captioning those one at a time" in printed.err) == (bound < need)


def test_an_output_that_is_not_a_captions_file_is_left_alone(videos, tmp_path, capsys):
    from vlcache.apps.cli import main as cli

    out = tmp_path / "notes.txt"
    out.write_text("my notes\nwhich -o must not eat\n")
    assert cli(["caption", str(videos[1][0]), "-o", str(out)]) == 2
    assert "is not a vlcache captions file" in capsys.readouterr().err
    assert out.read_text() == "my notes\nwhich -o must not eat\n" and not (tmp_path / "notes.txt.torn").exists()
