"""What the scheduler and an executor exchange: a job (an asked trial and where it stands),
an event (a stage's result, or a dead worker), and the executor protocol itself.

Two executors implement ``Executor``: Ray's (``search.executor``: one actor per worker, on a
cluster) and the local one (``search.local_executor``: one thread per worker in this process, no
Ray). ``make_executor`` picks one by the campaign's ``workers.executor``; the tests add a fake.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import optuna

from search import trials as T
from search.errors import DriverError

if TYPE_CHECKING:
    from search.campaign import Campaign


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


class ClusterLost(DriverError):
    """The executor's cluster is gone (its node's raylet or its GCS died): raised by
    ``wait_ready`` and ``next_event``. The driver stops as on Ctrl-C: the trials in flight are
    marked interrupted and run again on ``--resume``."""


class Executor(Protocol):
    """Runs trial stages on ``n_workers`` workers. The scheduler uses ``start`` .. ``close``;
    the driver also waits for the workers (``wait_ready``) and logs ``resources``."""

    n_workers: int
    resources: dict[str, Any]   # what each worker was given, for the log

    def wait_ready(self, check: Callable[[], None] = ...) -> list[dict[str, Any]]:
        """Block until every worker has loaded its models; each one's ``info()``. ``check`` is
        called about twice a second meanwhile (it raises to stop the wait). Raises
        ``ClusterLost`` when the workers' cluster is gone (as ``next_event`` does)."""
    def start(self, handoff: Callable[[int], Job | None]) -> None: ...
    def submit(self, job: Job) -> None: ...
    def next_event(self, timeout: float) -> Event | None: ...
    def replace_worker(self, worker: int) -> None: ...
    def close(self) -> None: ...


def takes_digest(run: Callable[..., Any]) -> bool:
    """Whether a worker's ``run`` accepts ``digest=`` (a worker written for an older brmerge
    may not): the executors pass the job's digest only to a worker that takes it."""
    params = inspect.signature(run).parameters.values()
    return any(p.name == "digest" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def make_executor(campaign: Campaign, *, n_workers: int | None = None,
                  worker_factory: Callable[..., Any] | None = None) -> Executor:
    """The campaign's executor (``workers.executor``), its workers starting to load. Ray is
    started (or joined, ``ray.address``) only for ``ray``; ``local`` never imports it."""
    if campaign.executor == "local":
        from search.local_executor import LocalExecutor

        return LocalExecutor(campaign, n_workers=n_workers, worker_factory=worker_factory)
    import importlib.util

    from search.errors import DriverError
    from search.executor import RayExecutor, start_ray

    if importlib.util.find_spec("ray") is None:
        raise DriverError("workers.executor: ray, but Ray is not installed: pip install 'ray[default]', "
                          "or set workers.executor: local to run the workers in this process")
    start_ray(campaign.ray_address)
    return RayExecutor(campaign, n_workers=n_workers, worker_factory=worker_factory)
