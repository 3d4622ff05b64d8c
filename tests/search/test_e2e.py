"""End to end on tiny models with a real local Ray (2 CPUs) and the real evaluator:
a short campaign, kill -9 of the driver and resume, an actor killed mid-trial, NaN
candidates, a repeated genome, export and reload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

from search import trials as T
from search.campaign import load_campaign
from search.driver import run_campaign
from search.trials import finished_trials
from search.status import summary_lines
from search.storage import load_study

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("ray") is None:   # not imported: start_ray must load it first
        pytest.skip("ray is not installed")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["BRMERGE_TEST_KILL_MARKER"] = str(tmp_path_factory.mktemp("marker") / "killed")
    from search.executor import start_ray

    start_ray(num_cpus=2)
    import ray

    yield ray
    ray.shutdown()


def _write_campaign(path: Path, zoo: dict[str, Path], **over) -> Path:
    data = {
        "name": "e2e", "base_model": str(zoo["base"]), "models": [str(zoo["ft_a"]), str(zoo["ft_b"])],
        "method": "ties", "sampler": "cmaes",
        "search": {"granularity": "block:2", "params": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}},
        "objectives": {"legal": 1.0, "health": 1.0},
        "eval": {"suite": "sample", "limit": 6, "stage1": 3},
        "budget": {"trials": 6}, "workers": {"count": 1}, "seed": 1,
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def _run(path: Path, directory: Path, **kw) -> optuna.Study:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "campaign.yaml").write_text(path.read_text())
    return run_campaign(load_campaign(path), directory, progress=False, **kw)


def test_short_campaign_then_repeat_and_export(ray_cluster, tiny_zoo, tmp_path):
    cfg = _write_campaign(tmp_path / "c.yaml", tiny_zoo)
    study = _run(cfg, tmp_path / "camp")
    done = finished_trials(study)
    assert len(done) == 6
    names = {t.user_attrs.get(T.A_BASELINE) for t in done}
    assert {"uniform", f"model:{tiny_zoo['ft_a']}", f"model:{tiny_zoo['ft_b']}"} <= names
    assert study.trials[0].user_attrs[T.A_BASELINE] == "uniform"  # queued first
    complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE]
    for t in complete:
        assert set(t.user_attrs[T.A_DOMAINS]) == {"legal", "health"}
        assert t.user_attrs[T.A_EVAL] > 0 and t.user_attrs[T.A_MATERIALIZE] > 0
        assert t.values[0] == t.user_attrs[T.A_SCORE]
    assert any("uniform" in line for line in summary_lines(study))

    # A repeated genome is told the cached values, not evaluated again.
    study.enqueue_trial(study.trials[0].params)
    _write_campaign(cfg, tiny_zoo, budget={"trials": 7})
    study = _run(cfg, tmp_path / "camp", resume=True)
    last = study.trials[-1]
    assert last.user_attrs[T.A_CACHED] == 0 and last.values == study.trials[0].values
    assert T.A_EVAL not in last.user_attrs
    assert len(finished_trials(study)) == 7

    # Export the best trial: re-scored on dev, equal to the trial; reloadable; card with scores.
    from transformers import AutoModelForCausalLM

    from search.export import export_trial

    res = export_trial(tmp_path / "camp", out=tmp_path / "export", device="cpu", progress=False,
                       log=lambda m: None)
    best = max(complete, key=lambda t: t.values[0])
    assert res.dev_score == best.values[0]
    assert res.test_score is not None and {r["name"] for r in res.rows} >= {"uniform"}
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert sum(p.numel() for p in model.parameters()) > 0
    card = (tmp_path / "export" / "README.md").read_text()
    assert "Search and scores" in card and "uniform" in card and "test score" in card
    prov = (tmp_path / "export" / "brmerge_provenance.json").read_text()
    assert '"search"' in prov and '"sampler": "cmaes"' in prov
    # intervals and paired weighted-score tests: verdicts on test (the export's own items), none on dev
    from evals.stats import decode_bits
    from evals.weighted_stats import weighted_comparison

    exported, uniform = res.rows[0], next(r for r in res.rows if r["name"] == "uniform")
    assert "[95% CI]" in card and "sign-flip" in card and "Holm" in card and "optimistic" in card
    assert "selected on these items, no verdict" in card and "looks at the test split" in card
    legal = exported["test_domains"]["legal"]
    assert legal["ci95"][0] <= legal["acc"] <= legal["ci95"][1]
    mine = {d: decode_bits(v) for d, v in exported["test_items"].items()}
    theirs = {d: decode_bits(v) for d, v in uniform["test_items"].items()}
    expected = weighted_comparison(mine, theirs, {d: 1.0 for d in mine})
    assert uniform["exported_minus_this"]["test"]["p_value"] == expected.p_value
    assert uniform["exported_minus_this"]["test"]["text"] in card
    assert uniform["exported_minus_this"]["dev"]["n"] == sum(v["n"] for v in exported["dev_domains"].values())
    assert uniform["exported_minus_this"]["dev"]["verdict"] is None


def test_worker_killed_mid_trial_is_replaced_and_trial_rerun(ray_cluster, tiny_zoo, tmp_path):
    from tests.search.workers import KillOnceWorker

    marker = Path(os.environ["BRMERGE_TEST_KILL_MARKER"])
    marker.unlink(missing_ok=True)
    cfg = _write_campaign(tmp_path / "c.yaml", tiny_zoo, name="killed", budget={"trials": 4})
    study = _run(cfg, tmp_path / "camp", worker_factory=KillOnceWorker)
    assert marker.exists()  # a worker really died
    done = finished_trials(study)
    assert len(done) == 4
    first = study.trials[0]
    assert first.state == optuna.trial.TrialState.COMPLETE and first.user_attrs[T.A_ATTEMPTS] == 2
    assert "died" in (tmp_path / "camp" / "campaign.log").read_text()


def test_non_finite_candidates_fail_with_reason_and_campaign_goes_on(ray_cluster, tiny_zoo, tmp_path):
    cfg = _write_campaign(tmp_path / "c.yaml", tiny_zoo, name="nan", method="task_arithmetic",
                          sampler="random", search={"granularity": "global", "params": {"weight": [1e40, 1e41]}},
                          eval={"suite": "sample", "limit": 6, "stage1": None}, budget={"trials": 4})
    study = _run(cfg, tmp_path / "camp")
    done = finished_trials(study)
    assert len(done) == 4
    assert all(t.state == optuna.trial.TrialState.FAIL for t in done)
    assert all("non-finite" in t.user_attrs[T.A_ERROR] for t in done)


def test_driver_killed_with_sigkill_resumes_without_losing_or_repeating(tiny_zoo, tmp_path):
    cfg = _write_campaign(tmp_path / "c.yaml", tiny_zoo, name="resume", budget={"trials": 7},
                          eval={"suite": "sample", "limit": 6, "stage1": None})
    directory = tmp_path / "camp"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "search", "search", str(cfg), "--dir", str(directory), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        storage = f"sqlite:///{(directory / 'study.db').resolve()}"
        deadline = time.time() + 240
        completed_before: dict[int, tuple] = {}
        while time.time() < deadline:
            time.sleep(0.5)
            try:
                study = optuna.load_study(study_name="resume", storage=storage)
            except Exception:  # not created yet
                continue
            trials = study.get_trials(deepcopy=False)
            completed = {t.number: (t.state.name, tuple(t.values or ())) for t in trials
                         if t.state.is_finished()}
            # a running trial with its whole genome (2 models x 2 params x 2 blocks) is mid-evaluation
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and len(t.params) == 8]
            if len(completed) >= 2 and running:
                os.kill(proc.pid, signal.SIGKILL)  # the driver only, mid-trial
                completed_before = completed
                break
        assert completed_before, "the campaign never reached two finished trials"
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver's orphaned local Ray processes
        except ProcessLookupError:
            pass
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=400, start_new_session=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    study = load_study(directory)
    trials = study.get_trials(deepcopy=False)
    for number, (state, values) in completed_before.items():
        assert (trials[number].state.name, tuple(trials[number].values or ())) == (state, values)
    interrupted = [t for t in trials if t.user_attrs.get(T.A_INTERRUPTED)]
    assert interrupted and all(t.state == optuna.trial.TrialState.FAIL for t in interrupted)
    assert len(finished_trials(study)) == 7  # the same budget, interrupted trials not counted
    # each interrupted trial with a complete genome was queued again and re-run with the same
    # parameters (one killed while still being sampled has no genome to re-run)
    assert any(len(t.params) == 8 for t in interrupted)
    for t in interrupted:
        if len(t.params) < 8:
            continue
        assert any(o.params == t.params and o.number > t.number and o.state.is_finished()
                   and not o.user_attrs.get(T.A_INTERRUPTED) for o in trials)
    # nothing completed was evaluated twice: every evaluated recipe appears once among non-cached trials
    digests = [t.user_attrs[T.A_DIGEST] for t in trials
               if t.state == optuna.trial.TrialState.COMPLETE and T.A_CACHED not in t.user_attrs]
    assert len(digests) == len(set(digests))


def test_sigterm_stops_like_ctrl_c_and_resume_finishes_the_budget(tiny_zoo, tmp_path):
    """What Slurm and Kubernetes send: trials in flight are interrupted and queued, the driver
    exits with the resume hint, and --resume ends at exactly the budget."""
    cfg = _write_campaign(tmp_path / "c.yaml", tiny_zoo, name="term", budget={"trials": 6},
                          eval={"suite": "sample", "limit": 6, "stage1": False})
    directory = tmp_path / "camp"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "search", "search", str(cfg), "--dir", str(directory), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{(directory / 'study.db').resolve()}"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            time.sleep(0.5)
            try:
                trials = optuna.load_study(study_name="term", storage=storage).get_trials(deepcopy=False)
            except Exception:  # not created yet
                continue
            if any(t.state.is_finished() for t in trials) and \
                    any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in out and "Traceback" not in err
    trials = optuna.load_study(study_name="term", storage=storage).get_trials(deepcopy=False)
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    assert any(t.user_attrs.get(T.A_INTERRUPTED) for t in trials)
    assert "stopped (SIGTERM)" in (directory / "campaign.log").read_text()
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(finished_trials(load_study(directory))) == 6
