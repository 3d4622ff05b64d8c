"""Killing the raylet of a running campaign's local cluster: the driver stops within a bound,
with one line, and the study resumes (trials in flight interrupted, queued again).

Without the cluster watch, Ray reports the workers' actors dead only after its node health
check gives up, the scheduler replaces them, and the replacements wait forever for a node: the
driver hung for minutes with no message.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from search import storage as S
from search import trials as T
from search.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray")]
REPO = Path(__file__).resolve().parents[2]
BOUND_S = 30.0   # the documented bound for a local cluster is a few seconds; the rest is start-up slack


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    return env


def _raylet_of(driver: psutil.Process) -> psutil.Process | None:
    """The raylet of the cluster this driver started: one of its own children, by name."""
    for child in driver.children(recursive=False):
        try:
            if child.name() == "raylet":
                return child
        except psutil.Error:
            continue
    return None


def test_killing_the_raylet_stops_the_driver_in_bounded_time_and_the_study_resumes(tiny_zoo, tmp_path, capsys):
    data = {"name": "raylet", "base_model": str(tiny_zoo["base"]),
            "models": [str(tiny_zoo["ft_a"]), str(tiny_zoo["ft_b"])], "method": "ties", "sampler": "random",
            "search": {"granularity": "global", "params": {"weight": [0.0, 1.0]}},
            "objectives": {"legal": 1.0}, "eval": {"suite": "sample", "limit": 4, "stage1": False},
            "budget": {"trials": 500}, "workers": {"count": 1, "gpus_per_worker": 0}, "seed": 0}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(data))
    camp = tmp_path / "camp"
    proc = subprocess.Popen([sys.executable, "-m", "search", "search", str(cfg), "--dir", str(camp), "--quiet"],
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        log = camp / "campaign.log"
        while time.monotonic() < deadline and proc.poll() is None:   # a trial has been told
            if log.is_file() and "ready on" in log.read_text() and S.sqlite_file(S.default_url(camp)).is_file():
                study = S.load_study(camp)
                if T.finished_trials(study):
                    break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()
        raylet = _raylet_of(psutil.Process(proc.pid))
        assert raylet is not None, "no raylet among the driver's children"
        raylet.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        out, err = proc.communicate(timeout=BOUND_S + 30)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"the driver stopped {took:.1f} s after the raylet was killed")
    assert took < BOUND_S, f"the driver took {took:.0f} s to stop"
    assert proc.returncode == 2
    lines = [line for line in err.strip().splitlines() if "Ray cluster is gone" in line]
    assert len(lines) == 1 and "raylet" in lines[0] and "--resume" in lines[0], err[-2000:]

    study = S.load_study(camp)
    done = len(T.finished_trials(study))
    running = [t for t in study.trials if t.state.name == "RUNNING"]
    assert not running, "trials left RUNNING: the stop did not mark them interrupted"
    assert "stopped: the Ray cluster is gone" in (camp / "campaign.log").read_text()

    # resumable: the same campaign (the local executor, no Ray) continues to one more trial
    cfg.write_text(yaml.safe_dump({**data, "budget": {"trials": done + 1},
                                   "workers": {"count": 1, "gpus_per_worker": 0, "executor": "local"}}))
    assert main(["search", str(cfg), "--dir", str(camp), "--resume", "--quiet"]) == 0
    assert len(T.finished_trials(S.load_study(camp))) == done + 1
