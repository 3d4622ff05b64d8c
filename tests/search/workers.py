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
