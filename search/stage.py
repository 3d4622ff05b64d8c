"""What a worker sends back for one evaluation stage: plain data, no Optuna.

A Ray worker imports this module and ``search.scoring``, never the study's record
(``search.trials``), so a worker process does not import Optuna.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StageResult:
    """One evaluation stage of one trial, as a worker reports it (never an exception).

    ``items`` maps a domain to the correctness of each scored item, in the order of the
    stage's item list (``item_ids``), so that two trials can be compared item by item;
    ``item_groups``, in the same order, each item's twin group (the data's ``pair_id``, "" for
    an item on its own), so that a test counts each group once.
    """

    worker: int
    stage: int
    final: bool = False
    score: float | None = None
    objectives: tuple[float, ...] = ()
    domains: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    items: Mapping[str, tuple[bool, ...]] = field(default_factory=dict)
    item_ids: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    item_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    materialize_seconds: float = 0.0
    eval_seconds: float = 0.0
    threads: int | None = None      # torch's CPU threads in the worker (the export's proof uses as many)
    dtype: str | None = None        # the live model's compute dtype (the export's proof uses the same)
    error: str | None = None
    traceback: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None

    def values(self, *, multi_objective: bool) -> list[float]:
        return list(self.objectives) if multi_objective else [float(self.score)]

    def finite(self, *, multi_objective: bool) -> bool:
        return all(math.isfinite(v) for v in self.values(multi_objective=multi_objective))

    def correct(self) -> list[bool]:
        """Every item's correctness, pooled over the domains (see ``pooled``)."""
        return pooled(self.items)


def pooled(bits: Mapping[str, Sequence[bool]]) -> list[bool]:
    """Per-item correctness of every domain in one list, domains in sorted order: the one
    order in which the pruning test and the readers' paired comparisons pool items."""
    return [bool(c) for d in sorted(bits) for c in bits[d]]
