"""The driver holds the campaign lock: a second driver (or --resume) while one runs is refused
with the live driver named; after kill -9, --resume takes over and finishes the budget."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_resume_while_the_driver_runs_is_refused_then_takes_over_after_kill9(tiny_zoo, tmp_path):
    # enough trials that the first driver still runs when the second has done its pre-flight
    # (which reads every model before it asks for the lock); 5 were sometimes done by then
    budget = 30
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "locked", "base_model": str(tiny_zoo["base"]), "models": [str(tiny_zoo["ft_a"]), str(tiny_zoo["ft_b"])],
        "method": "ties", "sampler": "random", "search": {"granularity": "global", "params": {"weight": [0.0, 1.0]}},
        "objectives": {"legal": 1.0}, "eval": {"suite": "sample", "limit": 6, "stage1": None},
        "budget": {"trials": budget}, "workers": {"count": 1}, "seed": 0}))
    directory = tmp_path / "camp"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "search", "search", str(cfg), "--dir", str(directory), "--quiet"]
    first = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        storage = f"sqlite:///{directory / 'study.db'}"
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name="locked", storage=storage).get_trials(deepcopy=False)
            except Exception:
                continue
            if any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
                break
        second = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()[-1]
        assert f"in use by a live driver (pid {first.pid} on {socket.gethostname()}, started " in err, second.stderr
        assert first.poll() is None  # the live driver goes on
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=400, start_new_session=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    trials = optuna.load_study(study_name="locked", storage=storage).get_trials(deepcopy=False)
    assert sum(t.state.is_finished() and not t.user_attrs.get("interrupted") for t in trials) == budget
