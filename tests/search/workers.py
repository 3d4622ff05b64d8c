"""Worker variants for fault tests (importable by Ray worker processes), and a model-free
fake worker with the local executor around it, for the scheduler's tests."""

from __future__ import annotations

import functools
import inspect
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from search.local_executor import LocalExecutor
from search.protocol import Job
from search.trials import StageResult
from search.worker import TrialWorker

# TrialWorker.run takes the job's digest (digest=) in newer versions: pass it on when it does
_DIGEST = "digest" in inspect.signature(TrialWorker.run).parameters


def _run_kw(digest: str | None) -> dict[str, Any]:
    return {"digest": digest} if _DIGEST else {}


class KillOnceWorker(TrialWorker):
    """Dies by SIGKILL in the middle of its first trial of the campaign (a marker file,
    named by $BRMERGE_TEST_KILL_MARKER, makes it happen once across restarts)."""

    def run(self, recipe_yaml: str, *, stage: int, digest: str | None = None) -> StageResult:
        marker = Path(os.environ["BRMERGE_TEST_KILL_MARKER"])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run(recipe_yaml, stage=stage, **_run_kw(digest))


class NodeRecordingWorker(TrialWorker):
    """Writes a record of each stage it runs (its node, pid and worker, at the start and at
    the end) as one JSON file under $BRMERGE_TEST_NODE_LOG, and sleeps
    $BRMERGE_TEST_STAGE_SLEEP seconds before scoring: a test can remove its node mid-trial."""

    def _record(self, phase: str, stage: int) -> None:
        import json

        import ray

        record = {"phase": phase, "stage": stage, "worker": self.worker_id, "pid": os.getpid(),
                  "node": ray.get_runtime_context().get_node_id(), "time": time.time()}
        folder = Path(os.environ["BRMERGE_TEST_NODE_LOG"])
        name = f"{time.time_ns()}-{os.getpid()}-{phase}.json"
        (folder / f".{name}").write_text(json.dumps(record))
        (folder / f".{name}").rename(folder / name)   # whole files only for the reader

    def run(self, recipe_yaml: str, *, stage: int, digest: str | None = None) -> StageResult:
        self._record("start", stage)
        time.sleep(float(os.environ.get("BRMERGE_TEST_STAGE_SLEEP", "1")))
        result = super().run(recipe_yaml, stage=stage, **_run_kw(digest))
        self._record("end", stage)
        return result


class SlowWorker(TrialWorker):
    """Sleeps $BRMERGE_TEST_STAGE_SLEEP seconds before each stage (a signal can land mid-trial)."""

    def run(self, recipe_yaml: str, *, stage: int, digest: str | None = None) -> StageResult:
        time.sleep(float(os.environ.get("BRMERGE_TEST_STAGE_SLEEP", "0.5")))
        return super().run(recipe_yaml, stage=stage, **_run_kw(digest))


class WorkerDied(RuntimeError):
    """Raised by ``OutcomeWorker`` to die: the local executor reports a dead worker."""


class OutcomeWorker:
    """A worker without a model: ``outcome(job)`` decides each stage, as in the scheduler's
    fake executor (a str: the worker dies with that error). ``job_of(digest)`` is the job the
    stage belongs to. Each stage takes ``STAGE_SECONDS``, so that a poll finds it running."""

    STAGE_SECONDS = 0.003

    def __init__(self, campaign: Any, worker_id: int, *, threads: int | None = None,
                 outcome: Callable[[Job], StageResult | str], job_of: Callable[[str], Job]):
        self.worker_id = worker_id
        self.outcome, self.job_of = outcome, job_of

    def info(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "device": "cpu", "load_seconds": 0.0}

    def run(self, recipe_yaml: str, *, stage: int, digest: str | None = None) -> StageResult:
        job = self.job_of(digest)
        assert (job.recipe_yaml, job.stage) == (recipe_yaml, stage), "the executor sent another job's stage"
        time.sleep(self.STAGE_SECONDS)
        out = self.outcome(job)
        if isinstance(out, str):
            raise WorkerDied(out)
        return out


class RecordingLocalExecutor(LocalExecutor):
    """The local executor over ``OutcomeWorker``s, recording what the scheduler tests' fake
    executor records: ``submitted`` (trial number, stage, worker), ``replaced``, ``handed``."""

    def __init__(self, n_workers: int, outcome: Callable[[Job], StageResult | str]):
        self.submitted: list[tuple[int, int, int]] = []
        self.replaced: list[int] = []
        self.handed = 0
        self._jobs: dict[str, Job] = {}
        factory = functools.partial(OutcomeWorker, outcome=outcome, job_of=self._jobs.__getitem__)
        super().__init__(SimpleNamespace(workers=n_workers, gpus_per_worker=0), n_workers=n_workers,
                         worker_factory=factory)

    def start(self, handoff: Callable[[int], Job | None]) -> None:
        def counted(worker: int) -> Job | None:
            nxt = handoff(worker)
            self.handed += nxt is not None
            return nxt

        super().start(counted)

    def submit(self, job: Job) -> None:
        self.submitted.append((job.trial.number, job.stage, job.worker))
        self._jobs[job.digest] = job   # a digest is run by one live job at a time (the others wait)
        super().submit(job)

    def replace_worker(self, worker: int) -> None:
        self.replaced.append(worker)
        super().replace_worker(worker)
