"""The sample videos the quickstart, `vlcache caption` and the demo open on: generated on first use from the
embedded model's synthetic world (none are bundled), into the user's cache folder."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from .video import frame_count, write_video

SAMPLE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlcache" / "samples"


def ensure_samples(folder: Path | None = None, count: int = 4, frames: int = 8) -> list[Path]:
    """Procedurally generated sample videos (written on first use) in `folder` (default SAMPLE_DIR): the embedded
        model's synthetic world, frames upscaled 8x (nearest) to 128 x 128, so that decoders and browsers handle them and
        the pixel the embedded processor samples from each 8 x 8 block lies away from the codec's colour interpolation at
        block edges. A sample that is not whole (a version before this one could leave a truncated file) is written
    again. Each is written to a file of its own and renamed into place, so a sample is whole or absent: a run
        killed while writing, or two first runs at once, never leave a truncated one behind."""
    import numpy as np
    from PIL import Image

    from .evaluation.tasks import SIZE, make_example

    folder = Path(SAMPLE_DIR if folder is None else folder)
    rng = np.random.default_rng(20261122)
    paths = []
    for i in range(count):
        ex = make_example("describe", frames, rng)
        path = folder / f"sample{i}.mp4"
        if not path.exists() or frame_count(path) != frames:  # absent, or cut short by a version before the rename
            _write_whole(path, [f.resize((8 * SIZE, 8 * SIZE), Image.NEAREST) for f in ex.frames])
        paths.append(path)
    return paths


def _write_whole(path: Path, frames) -> None:
    """Write to a name no other run uses (ending in .mp4: the container is chosen by it), then rename over `path`,
    which is atomic within a folder: the last of two concurrent writers wins with a file as whole as the first's."""
    part = path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:12]}.part{path.suffix}")
    try:
        write_video(part, frames)
        os.replace(part, path)
    except BaseException:  # KeyboardInterrupt too: the partial file goes (a SIGKILL leaves only this hidden one)
        part.unlink(missing_ok=True)
        raise
