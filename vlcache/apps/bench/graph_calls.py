"""Which decode steps of one run replayed a CUDA graph, counted at CUDA graph trees' own entry points.

Inductor's `cudagraph_skips` counter grows once per compiled function, not once per run: a row that reuses the graph
an earlier row compiled would never show a skip. The entry points say it for every step: `execute_node` replays a
recorded graph, `record_function` records one, `run_eager` runs a graph's warm-up (or a fallback) eagerly. A step
through none of them ran inductor's code without CUDA graphs (skipped); one through `record_function` or `run_eager`
after the first steps paid a recording where it should have replayed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ENTRIES = ("execute_node", "record_function", "run_eager")


@dataclass
class GraphCalls:
    """Install with `with GraphCalls(model) as calls:` around one generate; then `calls.steady(skip, steps)`."""

    model: object
    forwards: int = 0  # the model's forwards so far: 1 is the prompt, 1 + i decode step i
    calls: list[tuple[str, int]] = field(default_factory=list)  # (entry point, forward it ran in)
    available: bool = False  # whether this torch has CUDA graph trees' entry points (else nothing is known)

    def __enter__(self) -> GraphCalls:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.CUDAGraphTreeManager
        self._restore = []
        for entry in ENTRIES:
            real = getattr(manager, entry, None)
            if real is None:
                continue

            def counted(this, *args, _real=real, _entry=entry, **kwargs):
                self.calls.append((_entry, self.forwards))
                return _real(this, *args, **kwargs)

            setattr(manager, entry, counted)
            self._restore.append((manager, entry, real))
        self.available = len(self._restore) == len(ENTRIES)
        self._hook = self.model.register_forward_pre_hook(self._count)
        return self

    def __exit__(self, *exc) -> None:
        self._hook.remove()
        for owner, entry, real in self._restore:
            setattr(owner, entry, real)

    def _count(self, *_) -> None:
        self.forwards += 1

    def steady(self, skip: int, steps: int) -> dict | None:
        """Decode steps skip+1 .. steps (the benchmark's steady ones): how many replayed a graph and how many recorded
        or ran eagerly; None where this torch lacks the entry points."""
        if not self.available:
            return None
        wanted = range(skip + 2, steps + 2)  # decode step i is forward 1 + i
        replayed = {f for entry, f in self.calls if entry == "execute_node" and f in wanted}
        slow = {f for entry, f in self.calls if entry != "execute_node" and f in wanted}
        return dict(replayed=len(replayed), slow=len(slow), steps=len(wanted))


def all_replayed(steady: dict | None) -> bool | None:
    """Every steady step replayed a graph and none recorded or ran eagerly (None: not known)."""
    if steady is None:
        return None
    return steady["replayed"] == steady["steps"] > 0 and steady["slow"] == 0
