"""Every sampler of ``search.samplers.SAMPLERS`` under the campaign's use of Optuna, in the
manner of Optuna's own sampler suite (tests/samplers_tests/test_samplers.py there: each sampler
over the same properties): asynchronous ask/tell with several trials in flight, pruned and
failed trials mixed in, the baselines enqueued as the scheduler enqueues them, a resume by a new
sampler over the same storage, and seeded determinism. And the sampler lists users read (the
template, the docs) are the table's."""

from __future__ import annotations

import collections
import math
import re
from pathlib import Path

import optuna
import pytest

from search import trials as T
from search.samplers import MULTI_OBJECTIVE, SAMPLERS, make_sampler
from search.scheduler import Scheduler

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning",
                                        "ignore::FutureWarning")
REPO = Path(__file__).resolve().parents[2]

# A genome's shape: per-model weights in [0, 1] and a parameter with other bounds.
BOUNDS = {"w0": (0.0, 1.0), "w1": (0.0, 1.0), "w2": (0.0, 1.0), "w3": (0.0, 1.0), "density": (0.1, 1.0)}
DISTRIBUTIONS = {k: optuna.distributions.FloatDistribution(lo, hi) for k, (lo, hi) in BOUNDS.items()}
BASELINES = [("uniform", {"w0": 0.5, "w1": 0.5, "w2": 0.5, "w3": 0.5, "density": 1.0}),
             ("model:a", {"w0": 1.0, "w1": 1.0, "w2": 0.0, "w3": 0.0, "density": 0.1})]
# Whether the sampler's own model (``sample_relative``) must have proposed trials within the
# scenario below: a new sampler must be placed here. nsga2's first generation (50 trials) and
# random sample independently.
MODEL_BASED = {"cmaes": True, "tpe": True, "gp": True, "nsga2": False, "random": False}
N_TRIALS = 22      # tpe and gp start their model after 10 complete trials (samplers.py)
IN_FLIGHT = 3      # trials asked and not yet told, as with three workers


class Space:
    def param_names(self) -> list[str]:
        return list(BOUNDS)


def _objective(params: dict[str, float]) -> tuple[float, float]:
    return (-sum((v - 0.3) ** 2 for v in params.values()), params["w0"] - params["w1"])


def _scheduler(study: optuna.Study, storage) -> Scheduler:
    return Scheduler(study=study, storage=storage, space=Space(), budget=N_TRIALS)


def _study(name: str, seed: int, storage) -> optuna.Study:
    sampler = make_sampler(name, seed=seed, x0=BASELINES[0][1], n_baselines=len(BASELINES))
    multi = name in MULTI_OBJECTIVE
    return optuna.create_study(storage=storage, study_name="s", sampler=sampler, load_if_exists=True,
                               directions=["maximize", "maximize"] if multi else ["maximize"])


def _spy(study: optuna.Study) -> collections.Counter:
    """Counts the trials the sampler's model proposed (a non-empty ``sample_relative``)."""
    counts: collections.Counter = collections.Counter()
    relative = study.sampler.sample_relative

    def spy(st, trial, space):
        out = relative(st, trial, space)
        counts["model"] += bool(out)
        return out

    study.sampler.sample_relative = spy
    return counts


def _finish(study: optuna.Study, trial: optuna.trial.Trial, k: int) -> str:
    """Tell ``trial`` as the scheduler would: complete, pruned after stage 1 (single-objective
    campaigns only: multi-objective ones are not staged), or failed."""
    multi = len(study.directions) > 1
    values = _objective(trial.params)
    kind = ("complete", "complete", "pruned", "complete", "failed")[k % 5]
    if kind == "pruned" and not multi:
        trial.report(values[0], 0)
        study.tell(trial, state=T.TrialState.PRUNED)
    elif kind == "failed":
        study.tell(trial, state=T.TrialState.FAIL)
    else:
        kind = "complete"
        study.tell(trial, list(values) if multi else values[0])
    return kind


def _run(study: optuna.Study, n: int, *, leave: int = 0) -> list[optuna.trial.Trial]:
    """Ask ``n`` trials, ``IN_FLIGHT`` at a time, telling the oldest as a new one is asked;
    ``leave`` trials stay asked and untold at the end (a driver killed mid-run)."""
    flying: collections.deque = collections.deque()
    asked = []
    for k in range(n):
        trial = study.ask(DISTRIBUTIONS)
        asked.append(trial)
        flying.append(trial)
        if len(flying) >= IN_FLIGHT:
            _finish(study, flying.popleft(), k)
    while len(flying) > leave:
        _finish(study, flying.popleft(), n)
    return asked


def _assert_within_bounds(trials) -> None:
    for t in trials:
        assert set(t.params) == set(BOUNDS), t.params
        for name, value in t.params.items():
            lo, hi = BOUNDS[name]
            assert type(value) is float and lo <= value <= hi and math.isfinite(value), (name, value)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_async_ask_tell_with_pruned_and_failed_trials_and_baselines_first(name):
    storage = optuna.storages.InMemoryStorage()
    study = _study(name, 7, storage)
    _scheduler(study, storage).seed_baselines(BASELINES)
    proposals = _spy(study)
    _run(study, N_TRIALS)
    trials = study.get_trials()
    assert len(trials) == N_TRIALS
    # the baselines come out first, exactly, with their names
    for t, (label, params) in zip(trials, BASELINES):
        assert t.params == params and t.user_attrs[T.A_BASELINE] == label
    _assert_within_bounds(trials)
    states = collections.Counter(t.state.name for t in trials)
    assert states["FAIL"] > 0 and states["COMPLETE"] > 10 and not states["RUNNING"]
    assert (states["PRUNED"] > 0) == (name not in MULTI_OBJECTIVE)
    # tpe and gp past their startup trials, cmaes from the start: their model proposed trials
    assert set(MODEL_BASED) == set(SAMPLERS), "say in MODEL_BASED whether a new sampler models"
    assert (proposals["model"] > 0) == MODEL_BASED[name], proposals
    fresh = [tuple(t.params.values()) for t in trials[len(BASELINES):]]
    assert len(set(fresh)) == len(fresh)   # never the same point twice (constant liar, rng)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_resume_by_a_new_sampler_over_the_same_storage(name, tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = _study(name, 3, url)
    _scheduler(study, study._storage).seed_baselines(BASELINES)
    asked = _run(study, 16, leave=2)   # the driver dies with two trials in flight
    left = [t for t in study.get_trials() if t.state.name == "RUNNING"]
    assert [t.number for t in left] == [t.number for t in asked[-2:]]

    again = _study(name, 3, url)   # a new process: a new sampler, the same seed
    storage = again._storage
    _scheduler(again, storage).requeue_interrupted()
    _run(again, 8)
    trials = again.get_trials()
    assert len(trials) == 16 + 8 and not any(t.state.name == "RUNNING" for t in trials)
    # the interrupted trials failed (not counted) and ran again first, with their parameters
    assert all(T.interrupted(trials[t.number]) for t in left)
    assert [t.params for t in trials[16:18]] == [t.params for t in left]
    _assert_within_bounds(trials)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_the_same_seed_proposes_the_same_trials(name):
    def proposals(seed: int) -> list[tuple[float, ...]]:
        storage = optuna.storages.InMemoryStorage()
        study = _study(name, seed, storage)
        _scheduler(study, storage).seed_baselines(BASELINES)
        return [tuple(t.params.values()) for t in _run(study, N_TRIALS)]

    first = proposals(11)
    assert proposals(11) == first
    assert proposals(12)[len(BASELINES):] != first[len(BASELINES):]


def test_an_unknown_sampler_is_one_line_with_the_choices():
    from merge_core.errors import BrmergeError

    with pytest.raises(BrmergeError, match="unknown sampler 'bo'") as err:
        make_sampler("bo", seed=0)
    assert "\n" not in str(err.value) and all(n in str(err.value) for n in SAMPLERS)


# The lines that list the samplers for users: `sampler: NAME   # a | b | c`.
SAMPLER_LIST = re.compile(r"^\s*sampler:\s*\S+\s*#\s*(\w+(?:\s*\|\s*\w+)+)\s*$", re.M)


@pytest.mark.parametrize("path", ["search/campaign_template.yaml", "docs/campaigns.md"])
def test_the_sampler_lists_users_read_are_the_table(path):
    lists = SAMPLER_LIST.findall((REPO / path).read_text(encoding="utf-8"))
    assert lists, f"{path} has no `sampler: ... # a | b` line"
    for found in lists:
        assert [s.strip() for s in found.split("|")] == list(SAMPLERS), found
