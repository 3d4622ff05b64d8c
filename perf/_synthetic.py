"""A synthetic trial worker for scheduling benchmarks: no model, each trial sleeps.

``SleepWorker`` honours the worker contract the driver expects of ``search.worker.TrialWorker``
(``cls(campaign, worker_id, threads=...)``, ``info()``, ``run(recipe_yaml, stage=...)``), so
``search.driver.Driver(worker_factory=SleepWorker)`` schedules it exactly as it schedules real
trials. It lives in an importable module (not in the script) because Ray actors import the
class by its module path in their own processes.

Each run sleeps a duration drawn from a lognormal distribution seeded per worker (median
``PERF_SLEEP_MEDIAN`` seconds, shape ``PERF_SLEEP_SIGMA``), and appends its wall-clock busy
interval to ``$PERF_TRACE_DIR/<campaign>.worker-<id>.jsonl``: the driver records only what it needs
and kills its actors when it returns, so the trace files are how a benchmark reads back
what each worker did and when.

Not used by brmerge itself; see ``perf/scheduling.py``.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import zlib
from pathlib import Path
from typing import Any

TRACE_ENV = "PERF_TRACE_DIR"           # where run intervals are appended (unset: not recorded)
MEDIAN_ENV = "PERF_SLEEP_MEDIAN"       # median trial duration in seconds
SIGMA_ENV = "PERF_SLEEP_SIGMA"         # lognormal shape: 0.5 gives a p90/p10 spread of ~3.6x
DEFAULT_MEDIAN = 1.0
DEFAULT_SIGMA = 0.5


class SleepWorker:
    """A stand-in for ``TrialWorker`` whose trials are sleeps of random length."""

    def __init__(self, campaign: Any, worker_id: int, *, threads: int | None = None):
        self.worker_id = worker_id
        self.threads = threads
        self.domains = [d for d, w in campaign.objectives.items() if w > 0]
        self.objective_names = list(campaign.objectives)
        self.stage1 = bool(campaign.stage1) and not campaign.multi_objective
        # seeded per worker so the k-th trial a worker runs lasts as long in every loop compared
        self.rng = random.Random(campaign.seed * 1000 + worker_id)
        self.median = float(os.environ.get(MEDIAN_ENV, DEFAULT_MEDIAN))
        self.sigma = float(os.environ.get(SIGMA_ENV, DEFAULT_SIGMA))
        trace = os.environ.get(TRACE_ENV)
        # one file per campaign and worker: loops compared in one run use distinct campaign names
        self.trace: Path | None = (Path(trace) / f"{campaign.name}.worker-{worker_id}.jsonl"
                                   if trace else None)

    def info(self) -> dict[str, Any]:
        # The driver calls info() once every actor is built; the latest of these moments is when
        # its loop can start, so the benchmark's clock starts there (actor start-up excluded).
        self._record({"event": "ready", "t": time.time()})
        return {"worker": self.worker_id, "device": "cpu (synthetic)", "host": os.uname().nodename,
                "pid": os.getpid(), "load_seconds": 0.0}

    def _record(self, entry: dict[str, Any]) -> None:
        if self.trace is not None:
            with open(self.trace, "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"worker": self.worker_id, **entry}) + "\n")

    def run(self, recipe_yaml: str, *, stage: int):
        start = time.time()
        duration = self.median * math.exp(self.rng.gauss(0.0, self.sigma))
        if self.stage1 and stage == 1:
            duration *= 0.25  # stage 1 scores a quarter of the items
        time.sleep(duration)
        end = time.time()
        self._record({"event": "run", "start": start, "end": end, "stage": stage})
        # a score that varies with the genome, so samplers and the pruner see a landscape
        score = (zlib.crc32(recipe_yaml.encode()) % 10_000) / 10_000  # hash() is salted per process
        final = stage == 2 or not self.stage1
        from search.trials import StageResult

        return StageResult(worker=self.worker_id, stage=stage, final=final, score=score,
                           objectives=tuple([score] * len(self.objective_names)),
                           domains={d: {"acc": score, "gold_prob": score, "n": 1} for d in self.domains},
                           items={d: (score >= 0.5,) for d in self.domains},
                           item_ids={d: ("synthetic",) for d in self.domains},
                           eval_seconds=end - start)
