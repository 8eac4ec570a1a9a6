"""The one way benchmarks draw: a row of axes, saved as a PNG when the block ends."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def figure_row(path, panels: int, size: tuple[float, float], title: str | None = None):
    """Yields `panels` axes side by side; on leaving the block, titles the figure, saves it to `path` (110 dpi) and
    frees it. matplotlib is imported here, with the file-only Agg backend, so a benchmark without plots never
    loads it and a machine without a display never needs one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=size, squeeze=False)
    try:
        yield list(axes[0])
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def series_style(i: int) -> dict:
    """Plot style of the i-th series: matplotlib's ten colours, then the same colours dashed, so that eleven or more
    policies in one panel never share a look."""
    return dict(color=f"C{i % 10}", linestyle="-" if i < 10 else "--", marker="o", ms=3)
