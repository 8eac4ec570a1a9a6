"""Reading frames from videos (decord, PyAV where decord fails) and images (animated ones as videos), and writing
sample videos (PyAV), with errors that say what is wrong with the file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v"}


class VideoError(ValueError):
    """A video or image that cannot be used, with the reason."""


def _check_sampling(frames: int | None, target_fps: float | None, cap: int) -> None:
    """A ValueError naming the argument unless `frames` is a positive whole number or None, `target_fps` a positive
    finite number or None and `cap` a positive whole number (frames=0 was read as the default 8, and frames=-2 ended in
    numpy's own message)."""

    def whole(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

    if frames is not None and not (whole(frames) and frames >= 1):
        raise ValueError(f"frames must be a positive whole number or None, got {frames!r}")
    if target_fps is not None:
        number = isinstance(target_fps, (int, float, np.number)) and not isinstance(target_fps, (bool, np.bool_))
        if not (number and math.isfinite(target_fps) and target_fps > 0):
            raise ValueError(f"target_fps must be a positive number or None, got {target_fps!r}")
    if not (whole(cap) and cap >= 1):
        raise ValueError(f"cap must be a positive whole number, got {cap!r}")


def sample_indices(
    total: int, fps: float, frames: int | None = None, target_fps: float | None = None, cap: int = 64
) -> list[int]:
    """Frame indices: `frames` spread uniformly over the video (None: 8), or one every 1/target_fps seconds; at most
    `cap`."""
    _check_sampling(frames, target_fps, cap)
    if total <= 0:
        raise VideoError("video has no frames")
    if target_fps is not None:
        step = max(fps / target_fps, 1.0) if fps > 0 else 1.0
        idx = np.arange(0, total, step)
        if len(idx) > cap:
            idx = np.linspace(0, total - 1, cap)
    else:
        n = min(8 if frames is None else frames, cap, total)
        idx = np.linspace(0, total - 1, n)
    return sorted({int(round(i)) for i in idx})


def read_frames(
    path: str | Path, frames: int | None = 8, target_fps: float | None = None, cap: int = 64
) -> list[Image.Image]:
    """RGB frames of a video, or of an animated image (GIF, WebP, APNG) read as one; a still image is one frame.
    Videos go through decord, and through PyAV where decord fails on a file (it cannot convert H.264 frames a few
    dozen pixels wide, for one). `frames`: how many, spread uniformly (None: 8); `target_fps` instead: one frame
    every 1/target_fps seconds; never more than `cap`."""
    _check_sampling(frames, target_fps, cap)  # before the file: a bad argument is not the file's fault
    path = Path(path)
    if not path.exists():
        raise VideoError(f"file not found: {path}")
    if path.is_dir():
        raise VideoError(f"is a directory, not a video: {path}")
    if path.stat().st_size == 0:
        raise VideoError(f"empty file: {path}")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _read_image(path, frames, target_fps, cap)
    try:
        return _read_decord(path, frames, target_fps, cap)
    except VideoError as first:
        try:
            return _read_av(path, frames, target_fps, cap)
        except VideoError:
            raise first from None  # decord's reason: it read the file first


def _read_image(path: Path, frames, target_fps, cap) -> list[Image.Image]:
    try:
        with Image.open(path) as im:
            total = getattr(im, "n_frames", 1)
            if total <= 1:
                return [im.convert("RGB")]
            durations = []
            for i in range(total):
                im.seek(i)
                durations.append(im.info.get("duration") or 100)  # ms; GIFs without one play at 10 fps
            idx = sample_indices(total, 1000.0 * total / sum(durations), frames, target_fps, cap)
            out = []
            for i in idx:
                im.seek(i)
                out.append(im.convert("RGB"))
            return out
    except (OSError, ValueError, EOFError) as e:
        raise VideoError(f"cannot read image: {e}") from e


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _read_decord(path: Path, frames, target_fps, cap) -> list[Image.Image]:
    try:
        import decord
    except ImportError as e:  # pragma: no cover - the video extra is missing; PyAV may still be there
        raise VideoError("reading videos needs decord or PyAV: pip install 'vlcache[video]'") from e
    try:
        reader = decord.VideoReader(str(path))
        total = len(reader)
        fps = float(reader.get_avg_fps() or 0.0)
    except Exception as e:  # decord raises its own DECORDError (and RuntimeError) for corrupt files
        raise VideoError(f"cannot decode video: {_first_line(e)}") from e
    idx = sample_indices(total, fps, frames, target_fps, cap)
    try:
        batch = reader.get_batch(idx).asnumpy()
    except Exception as e:
        raise VideoError(f"cannot decode frames {idx[:4]}...: {_first_line(e)}") from e
    return [Image.fromarray(f) for f in batch]


def _read_av(path: Path, frames, target_fps, cap) -> list[Image.Image]:
    try:
        import av
    except ImportError as e:  # pragma: no cover
        raise VideoError("reading videos needs decord or PyAV: pip install 'vlcache[video]'") from e
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0.0)
            total = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        idx = sample_indices(total, fps, frames, target_fps, cap)
        wanted, out = set(idx), []
        with av.open(str(path)) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    out.append(frame.to_image().convert("RGB"))
                if len(out) == len(wanted):
                    break
    except VideoError:
        raise
    except Exception as e:  # PyAV raises its own error types (av.error.*) for unreadable files
        raise VideoError(f"cannot decode video: {_first_line(e)}") from e
    if not out:
        raise VideoError("video has no frames")
    return out


def frame_count(path: str | Path) -> int:
    """How many frames a video holds, from its container's index where it has one (0 when it cannot be read: a
    truncated MP4 has lost the index written at its end)."""
    try:
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            return stream.frames or sum(1 for p in container.demux(stream) if p.size)
    except Exception:  # PyAV raises its own error types (av.error.*), IndexError where there is no video stream
        return 0


def write_video(path: str | Path, frames: list[Image.Image], fps: int = 4, exact_rgb: bool = False) -> Path:
    """Write frames as an H.264 video at crf 0: yuv420p, which every browser plays (colours move by a few levels
    in the RGB-YUV round trip, more at sharp colour edges), or with `exact_rgb` libx264rgb, which gives the pixels
    back exactly but shows with wrong colours in browsers."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = frames[0].size
    codec, pix = ("libx264rgb", "rgb24") if exact_rgb else ("libx264", "yuv420p")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options={"crf": "0"})
        stream.width, stream.height, stream.pix_fmt = w, h, pix
        for im in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.asarray(im.convert("RGB")), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def collect_inputs(items: list[str]) -> list[Path]:
    """Videos and images from paths, folders (their video and image files, sorted) and .txt lists of paths.
    Missing paths are kept: they become error records rather than stopping the run."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(f for f in p.iterdir() if f.suffix.lower() in VIDEO_SUFFIXES | IMAGE_SUFFIXES)
        elif p.suffix.lower() == ".txt" and p.exists():
            base = p.parent
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line)
                    out.append(q if q.is_absolute() else base / q)
        else:
            out.append(p)
    return list(dict.fromkeys(out))  # each path once, first mention first
