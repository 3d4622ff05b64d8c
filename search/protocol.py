"""What the scheduler and an executor exchange: a job (an asked trial and where it stands),
an event (a stage's result, or a dead worker), and the executor protocol itself.

Ray implements ``Executor`` in ``search.executor``; the tests implement it with a fake.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import optuna

from search import trials as T


@dataclass
class Job:
    """An asked trial and where it stands."""

    trial: optuna.trial.Trial
    digest: str
    recipe_yaml: str
    stage: int = 1
    worker: int = -1
    attempts: int = 1
    started: float = field(default_factory=time.time)
    materialize_s: float = 0.0
    eval_s: float = 0.0


@dataclass(frozen=True)
class Event:
    """A stage finished on a worker (``result``), or the worker died running it (``error``).
    ``handed``: the executor already gave that worker its next job through ``handoff``."""

    job: Job
    result: T.StageResult | None = None
    error: str | None = None
    handed: bool = False


class Executor(Protocol):
    n_workers: int

    def start(self, handoff: Callable[[int], Job | None]) -> None: ...
    def submit(self, job: Job) -> None: ...
    def next_event(self, timeout: float) -> Event | None: ...
    def replace_worker(self, worker: int) -> None: ...
    def close(self) -> None: ...
