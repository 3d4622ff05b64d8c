"""The local executor (``workers.executor: local``): threads in the driver's process, no Ray.

Its policies are the scheduler's (tests/search/test_scheduler.py runs them on it too); here:
its own failure and stop semantics, the choice through the campaign, a campaign run through
the command line with Ray impossible to import, Ctrl-C, and the same trials as Ray's executor.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from search import trials as T
from search.campaign import CampaignError, parse_campaign
from search.local_executor import LocalExecutor
from search.protocol import Job
from search.stage import StageResult

REPO = Path(__file__).resolve().parents[2]


def _job(worker: int = 0, number: int = 0) -> Job:
    return Job(trial=SimpleNamespace(number=number), digest=f"d{number}", recipe_yaml=f"r{number}\n",
               worker=worker)


class Scripted:
    """A worker whose ``run`` does what ``script(recipe_yaml, stage)`` says: returns a final
    result, raises, or waits on ``gate`` first."""

    loads = 0
    gate: threading.Event | None = None

    def __init__(self, campaign, worker_id, *, threads=None, script=None):
        Scripted.loads += 1
        if script == "load-fails":
            raise RuntimeError("CUDA out of memory while loading")
        self.worker_id, self.script = worker_id, script

    def info(self) -> dict:
        return {"worker": self.worker_id, "device": "cpu", "load_seconds": 0.0}

    def run(self, recipe_yaml: str, *, stage: int, digest: str | None = None) -> StageResult:
        if self.script == "crash-once" and Scripted.loads == 1:
            raise MemoryError("worker ran out of memory")
        if self.gate is not None:
            self.gate.wait(10)
        return StageResult(worker=self.worker_id, stage=stage, final=True, score=0.5, objectives=(0.5,))


def _executor(n: int = 1, **kw) -> LocalExecutor:
    Scripted.loads, Scripted.gate = 0, None
    factory = (lambda c, i, threads=None: Scripted(c, i, threads=threads, **kw))
    return LocalExecutor(SimpleNamespace(workers=n, gpus_per_worker=0), n_workers=n, worker_factory=factory)


def test_an_exception_escaping_a_worker_is_a_dead_worker_and_a_replacement_runs_the_job():
    ex = _executor(script="crash-once")
    assert [i["worker"] for i in ex.wait_ready()] == [0]
    ex.start(lambda worker: None)
    job = _job()
    ex.submit(job)
    event = ex.next_event(5.0)
    assert event.job is job and event.result is None and event.error == "MemoryError: worker ran out of memory"
    ex.replace_worker(0)   # what the scheduler does, then it submits the trial again
    ex.submit(job)
    event = ex.next_event(5.0)
    assert event.error is None and event.result.score == 0.5 and Scripted.loads == 2
    ex.close()


def test_a_worker_that_cannot_load_raises_in_wait_ready_and_its_jobs_are_dead_worker_events():
    ex = _executor(script="load-fails")
    with pytest.raises(RuntimeError, match="out of memory while loading"):
        ex.wait_ready()
    ex.start(lambda worker: None)
    ex.submit(_job())
    event = ex.next_event(5.0)
    assert "failed to load" in event.error and "out of memory" in event.error
    ex.close()


def test_a_finishing_worker_takes_its_next_job_through_the_handoff():
    ex = _executor()
    nxt = _job(number=1)
    handed = []
    ex.start(lambda worker: handed.append(worker) or (nxt if len(handed) == 1 else None))
    ex.submit(_job(number=0))
    first, second = ex.next_event(5.0), ex.next_event(5.0)
    assert handed == [0, 0] and first.handed and not second.handed
    assert [first.job.trial.number, second.job.trial.number] == [0, 1]
    ex.close()


def test_close_ends_idle_workers_now_and_drops_a_busy_ones_result():
    ex = _executor(n=2)
    ex.wait_ready()
    Scripted.gate = threading.Event()
    ex.start(lambda worker: None)
    ex.submit(_job(worker=0))
    time.sleep(0.1)   # worker 0 is inside run, waiting on the gate
    started = time.monotonic()
    ex.close()
    assert time.monotonic() - started < 2.0   # not held up by the busy worker
    idle, busy = ex._slots[1].thread, ex._slots[0].thread
    assert not idle.is_alive() and busy.is_alive()
    Scripted.gate.set()
    busy.join(5.0)
    assert not busy.is_alive() and ex.next_event(0.2) is None   # its result was dropped


# A process that stops while its worker is inside torch kernels for ``sys.argv[1]`` seconds, then
# exits with 130 as `brmerge search` does after a Ctrl-C. Ctrl-C raises KeyboardInterrupt as in a
# terminal even when the tests run in the background (where a shell starts them ignoring SIGINT).
ABANDON = """
import signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from types import SimpleNamespace
import torch
from search.local_executor import LocalExecutor
from search.protocol import Job
inside = threading.Event()

class Spinning:
    def __init__(self, campaign, worker_id, threads=None):
        pass

    def run(self, recipe_yaml, *, stage):
        a, end = torch.randn(256, 256), time.monotonic() + float(sys.argv[1])
        inside.set()
        while time.monotonic() < end:
            a = (a @ a).tanh()
        print("stage ended", flush=True)

ex = LocalExecutor(SimpleNamespace(workers=1, gpus_per_worker=0), n_workers=1, worker_factory=Spinning)
ex.wait_ready()
ex.submit(Job(trial=SimpleNamespace(number=0), digest="d", recipe_yaml="r\\n", worker=0))
inside.wait(10)
ex.close()
print("closed", flush=True)
sys.exit(130)
"""


def _abandon(seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ABANDON, str(seconds)], cwd=REPO, env=_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_stage_abandoned_by_close_ends_before_the_process_exits_with_its_code():
    """A thread stopped inside a torch kernel by the interpreter's shutdown aborts the process
    ("terminate called without an active exception", exit 134: seen when a local campaign was
    stopped mid-stage). The abandoned stage is waited for at exit, so the exit code is the
    program's own."""
    proc = _abandon(1.5)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "terminate called" not in err
    assert out.splitlines() == ["closed", "stage ended"]        # close() did not wait; the exit did
    assert "1 stopped worker(s) finishing a running stage before exit" in err


def test_a_second_ctrl_c_while_an_abandoned_stage_runs_exits_at_once_with_130():
    proc = _abandon(120)
    try:
        for line in proc.stderr:   # the exit's wait has begun
            if "finishing a running stage" in line:
                break
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and time.monotonic() - started < 10
    assert "stage ended" not in out and "terminate called" not in err


def test_a_keyboard_interrupt_in_a_worker_is_raised_in_the_scheduler_thread():
    def factory(c, i, threads=None):
        worker = Scripted(c, i)
        worker.run = lambda recipe_yaml, *, stage, digest=None: (_ for _ in ()).throw(KeyboardInterrupt("stop"))
        return worker

    ex = LocalExecutor(SimpleNamespace(workers=1, gpus_per_worker=0), n_workers=1, worker_factory=factory)
    ex.start(lambda worker: None)
    ex.submit(_job())
    with pytest.raises(KeyboardInterrupt):
        ex.next_event(5.0)
    ex.close()


def test_the_executor_key_is_validated_with_its_choices_in_one_line():
    base = {"name": "x", "base_model": "b", "models": ["a", "c"]}
    assert parse_campaign(base).executor == "ray"
    assert parse_campaign({**base, "workers": {"executor": "local"}}).executor == "local"
    with pytest.raises(CampaignError, match=r"workers.executor 'dask' must be one of ray, local") as err:
        parse_campaign({**base, "workers": {"executor": "dask"}})
    assert "\n" not in str(err.value)


def test_the_ray_executor_without_ray_installed_is_one_line_naming_local(monkeypatch):
    import importlib.util

    from search.errors import DriverError
    from search.protocol import make_executor

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    campaign = parse_campaign({"name": "x", "base_model": "b", "models": ["a", "c"]})
    with pytest.raises(DriverError, match="Ray is not installed") as err:
        make_executor(campaign)
    assert "workers.executor: local" in str(err.value) and "\n" not in str(err.value)


# -- whole campaigns, each in a process of its own ---------------------------------------------

def _campaign(path: Path, zoo: dict[str, Path], *, executor: str, trials: int = 5) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "local", "base_model": str(zoo["base"]), "models": [str(zoo["ft_a"]), str(zoo["ft_b"])],
        "method": "ties", "sampler": "cmaes",
        "search": {"granularity": "global", "params": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}},
        "objectives": {"legal": 1.0, "health": 1.0},
        "eval": {"suite": "sample", "limit": 6, "stage1": 3},
        "budget": {"trials": trials}, "workers": {"count": 1, "executor": executor}, "seed": 1}))
    return path


# Runs `brmerge search` with `ray` impossible to import (as on a machine without it), then
# prints whether any module named ray was loaded.
NO_RAY = """
import importlib.abc, json, sys
class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is not installed")
sys.meta_path.insert(0, NoRay())
from search.cli import main
rc = main(["search", sys.argv[1], "--dir", sys.argv[2], "--quiet"])
print(json.dumps({"rc": rc, "ray": sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))}))
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    return env


def _trials(directory: Path) -> list[tuple]:
    study = optuna.load_study(study_name="local", storage=f"sqlite:///{directory / 'study.db'}")
    return [(t.number, t.state.name, t.params, t.values, t.user_attrs.get(T.A_BASELINE)) for t in study.trials]


@pytest.mark.slow
def test_a_local_campaign_never_imports_ray_and_records_the_same_trials_as_ray(tiny_zoo, tmp_path):
    local = subprocess.run([sys.executable, "-c", NO_RAY, str(_campaign(tmp_path / "l.yaml", tiny_zoo,
                           executor="local")), str(tmp_path / "local")], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    out = json.loads(local.stdout.strip().splitlines()[-1])
    assert out == {"rc": 0, "ray": []}
    mine = _trials(tmp_path / "local")
    assert len(mine) == 5 and all(state == "COMPLETE" for _, state, *_ in mine)

    if not __import__("importlib").util.find_spec("ray"):
        pytest.skip("ray is not installed: nothing to compare with")
    ray = subprocess.run([sys.executable, "-m", "search", "search",
                          str(_campaign(tmp_path / "r.yaml", tiny_zoo, executor="ray")),
                          "--dir", str(tmp_path / "ray"), "--quiet"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert ray.returncode == 0, ray.stderr[-3000:]
    theirs = _trials(tmp_path / "ray")
    # the same trials, params and baselines in the same order; scores equal up to the last bits
    # of float32 sums (a CPU kernel's reduction order may differ between the two processes'
    # thread pools: 2.5e-10 apart was seen once under load)
    assert [(n, s, p, b) for n, s, p, _, b in theirs] == [(n, s, p, b) for n, s, p, _, b in mine]
    for (*_, ours, _b), (*_, other, _b2) in zip(mine, theirs):
        assert other == pytest.approx(ours, rel=1e-7, abs=1e-9)


# A driver whose worker sleeps before each stage, so that a signal lands mid-trial.
SLOW = """
import sys
from pathlib import Path
from search.campaign import load_campaign
from search.driver import Driver
from tests.search.workers import SlowWorker
try:
    Driver(load_campaign(sys.argv[1]), Path(sys.argv[2]), worker_factory=SlowWorker, progress=False,
           log=lambda m: print(m, flush=True)).run()
except KeyboardInterrupt as stop:
    print(f"STOPPED {stop}", flush=True)
    sys.exit(130)
"""


@pytest.mark.slow
def test_ctrl_c_stops_a_local_campaign_at_a_safe_point(tiny_zoo, tmp_path):
    cfg = _campaign(tmp_path / "c.yaml", tiny_zoo, executor="local", trials=30)
    proc = subprocess.Popen([sys.executable, "-c", SLOW, str(cfg), str(tmp_path / "camp")], cwd=REPO,
                            env={**_env(), "BRMERGE_TEST_STAGE_SLEEP": "0.4"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    for line in proc.stdout:   # the first recorded trial, then Ctrl-C
        lines.append(line)
        if line.startswith("trial ") and "score" in line:
            proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "STOPPED SIGINT" in out and "queued again for --resume" in "".join(lines) + out
    trials = optuna.load_study(study_name="local", storage=f"sqlite:///{tmp_path / 'camp' / 'study.db'}").trials
    assert not any(t.state.name == "RUNNING" for t in trials)
    interrupted = [t for t in trials if T.interrupted(t)]
    assert interrupted and all(t.state.name == "FAIL" for t in interrupted)
    # each one caught whole is queued again for --resume (one caught half-sampled is not);
    # baselines never asked yet wait there too
    genome = set(trials[0].params)
    waiting = Counter(json.dumps(t.system_attrs["fixed_params"], sort_keys=True)
                      for t in trials if t.state.name == "WAITING")
    again = Counter(json.dumps(t.params, sort_keys=True) for t in interrupted if set(t.params) == genome)
    assert again and not again - waiting
    assert 1 <= sum(T.counts_toward_budget(t) for t in trials) < 30
