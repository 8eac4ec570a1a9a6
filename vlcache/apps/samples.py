"""The sample videos the quickstart, `vlcache caption` and the demo open on: generated on first use from the
embedded model's synthetic world (none are bundled), into the user's cache folder."""

from __future__ import annotations

import os
from pathlib import Path

from .video import write_video

SAMPLE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlcache" / "samples"


def ensure_samples(folder: Path = SAMPLE_DIR, count: int = 4, frames: int = 8) -> list[Path]:
    """Procedurally generated sample videos (written on first use): the embedded model's synthetic world, frames
    upscaled 8x (nearest) to 128 x 128, so that decoders and browsers handle them and the pixel the embedded
    processor samples from each 8 x 8 block lies away from the codec's colour interpolation at block edges."""
    import numpy as np
    from PIL import Image

    from .evaluation.tasks import SIZE, make_example

    folder = Path(folder)
    rng = np.random.default_rng(20261122)
    paths = []
    for i in range(count):
        ex = make_example("describe", frames, rng)
        path = folder / f"sample{i}.mp4"
        if not path.exists():
            write_video(path, [f.resize((8 * SIZE, 8 * SIZE), Image.NEAREST) for f in ex.frames])
        paths.append(path)
    return paths
