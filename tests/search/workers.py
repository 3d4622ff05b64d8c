"""Worker variants for fault tests (importable by Ray worker processes)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from search.trials import StageResult
from search.worker import TrialWorker


class KillOnceWorker(TrialWorker):
    """Dies by SIGKILL in the middle of its first trial of the campaign (a marker file,
    named by $BRMERGE_TEST_KILL_MARKER, makes it happen once across restarts)."""

    def run(self, recipe_yaml: str, *, stage: int) -> StageResult:
        marker = Path(os.environ["BRMERGE_TEST_KILL_MARKER"])
        if not marker.exists():
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().run(recipe_yaml, stage=stage)


class NodeRecordingWorker(TrialWorker):
    """Writes a record of each stage it runs (its node, pid and worker, at the start and at
    the end) as one JSON file under $BRMERGE_TEST_NODE_LOG, and sleeps
    $BRMERGE_TEST_STAGE_SLEEP seconds before scoring: a test can remove its node mid-trial."""

    def _record(self, phase: str, stage: int) -> None:
        import json
        import time

        import ray

        record = {"phase": phase, "stage": stage, "worker": self.worker_id, "pid": os.getpid(),
                  "node": ray.get_runtime_context().get_node_id(), "time": time.time()}
        folder = Path(os.environ["BRMERGE_TEST_NODE_LOG"])
        name = f"{time.time_ns()}-{os.getpid()}-{phase}.json"
        (folder / f".{name}").write_text(json.dumps(record))
        (folder / f".{name}").rename(folder / name)   # whole files only for the reader

    def run(self, recipe_yaml: str, *, stage: int) -> StageResult:
        import time

        self._record("start", stage)
        time.sleep(float(os.environ.get("BRMERGE_TEST_STAGE_SLEEP", "1")))
        result = super().run(recipe_yaml, stage=stage)
        self._record("end", stage)
        return result
