"""The four parts a compression policy is made of, and their registries.

- scorer: ranks a layer's slots ([B, Hk, T], higher kept first) and names what it never evicts: a `Policy`
  subclass with its own `score(view)` (and optionally `always_keep`); the published methods' classes are the
  scorers of their presets.
- allocator (`Allocator`): splits the model-wide budget over layers (uniform, pyramid, density, preference).
- merger (`Merger`): what happens to the entries a cut evicts (none, lookm, elastic).
- schedule (`Schedule`): when the cache is cut (prefill: once, after the prompt; h2o, streamingllm, cake, elastic:
  also while decoding, every `evict_every` tokens, to hold the size the prefill left).

`Composed` (policies/compose.py) puts one of each together; `presets.py` writes every published method as its
parts. A new part is one class in one file, registered with `register_scorer` / `register_allocator` /
`register_merger` / `register_schedule`, after which it combines with every part of the other kinds.

Parts other than scorers run the code of a published method (`uses`): the part is built with the composition's
amounts and those of its settings the method has, and keeps its state where that method does (`LayerStatistics`,
`EvictionState` and their extensions), never in loose string keys.
"""

from __future__ import annotations

from ..base import Policy
from .kinds import Allocator, Merger, Schedule

SCORERS: dict[str, type[Policy]] = {}
ALLOCATORS: dict[str, type[Allocator]] = {}
MERGERS: dict[str, type[Merger]] = {}
SCHEDULES: dict[str, type[Schedule]] = {}


def _register(registry: dict, kind: str, base: type, name: str):
    if name in registry:
        raise ValueError(f"{kind} {name!r} exists already; choose another name")

    def add(cls):
        if base is Policy:
            if not (isinstance(cls, type) and issubclass(cls, Policy)) or cls.score is Policy.score:
                raise ValueError(f"a scorer is a Policy subclass with its own score(view); got {cls!r}")
        elif not (isinstance(cls, type) and issubclass(cls, base)):
            raise ValueError(f"a {kind} is a subclass of vlcache.policies.parts.{base.__name__}; got {cls!r}")
        registry[name] = cls
        if base is not Policy:
            cls.name = name
        return cls

    return add


def register_scorer(name: str):
    """Class decorator: a new scorer, as one file. The class is a `Policy` whose `score(view)` ranks the slots
    ([B, Hk, T], higher kept first) and whose `always_keep` (optional) names what it never evicts:

        @register_scorer("mine")
        @dataclass(kw_only=True)
        class Mine(Policy):
            def score(self, view): ...

        Composed(vision_budget=0.05, scorer="mine", allocator="preference", schedule="h2o")
    """
    return _register(SCORERS, "scorer", Policy, name)


def register_allocator(name: str):
    """Class decorator: a new split of the budget over layers (an `Allocator` subclass), as one file."""
    return _register(ALLOCATORS, "allocator", Allocator, name)


def register_merger(name: str):
    """Class decorator: a new treatment of evicted entries (a `Merger` subclass), as one file."""
    return _register(MERGERS, "merger", Merger, name)


def register_schedule(name: str):
    """Class decorator: a new decode-time schedule (a `Schedule` subclass), as one file."""
    return _register(SCHEDULES, "schedule", Schedule, name)


def _builtin():
    # the built-in parts register themselves on import; kept in a function so the registries exist first
    from . import allocators, mergers, schedules, scorers  # noqa: F401


_builtin()

__all__ = [
    "ALLOCATORS",
    "Allocator",
    "MERGERS",
    "Merger",
    "SCHEDULES",
    "SCORERS",
    "Schedule",
    "register_allocator",
    "register_merger",
    "register_schedule",
    "register_scorer",
]
