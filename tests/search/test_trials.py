"""The record's writers and its typed view (``search.trials``): what is written is what is read."""

from __future__ import annotations

import datetime as dt

import optuna
import pytest

from search import trials as T
from search.errors import SchedulerError

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study() -> optuna.Study:
    return optuna.create_study(storage=optuna.storages.InMemoryStorage(), direction="maximize")


def test_every_transition_written_is_read_back_by_the_view():
    study = _study()
    T.enqueue_baseline(study, {"x": 0.5}, "uniform")
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    T.record_asked(trial, digest="d1", recipe_yaml="merge_method: linear\n")
    T.record_stage1(trial, score=0.4, items={"legal": [True, False]}, decision={"prune": False, "reason": "r"})
    T.record_run(trial, domains={"legal": {"acc": 0.5, "gold_prob": 0.4, "n": 4}}, materialize_s=1.23456,
                 eval_s=2.5, worker=3, attempts=2, started=100.0, threads=4, dtype="bfloat16")
    T.record_final(trial, score=0.6, items={"legal": [True, True, False, True]})
    study.tell(trial, 0.7)
    v = T.view(study.trials[0])
    assert (v.number, v.state, v.values, v.score) == (0, T.TrialState.COMPLETE, (0.7,), 0.6)
    assert (v.digest, v.recipe, v.baseline, v.label) == ("d1", "merge_method: linear\n", "uniform", "#0 uniform")
    assert v.stage1_score == 0.4 and v.prune == {"prune": False, "reason": "r"}
    assert v.items() == {"legal": [True, True, False, True]} and v.items(stage1=True) == {"legal": [True, False]}
    assert (v.materialize_seconds, v.eval_seconds, v.worker, v.attempts) == (1.2346, 2.5, 3, 2)
    assert (v.threads, v.dtype, v.started_at) == (4, "bfloat16", 100.0) and v.finished_at >= 100.0
    assert not v.interrupted and v.cached_from is None and v.error is None and v.counts
    assert study.trials[0].intermediate_values == {0: 0.4}   # stage 1 is the step-0 report


def test_cached_failed_and_interrupted_trials_read_as_such():
    study = _study()
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    src = study.ask(dist)
    T.record_final(src, score=0.3, items={"legal": [True]})
    study.tell(src, 0.3)
    copy = study.ask(dist)
    T.record_cached(copy, study.trials[0])
    study.tell(copy, 0.3)
    bad = study.ask(dist)
    T.record_failure(bad, "boom", traceback="tb", worker=1, attempts=3)
    study.tell(bad, state=T.TrialState.FAIL)
    gone = study.ask(dist)
    T.record_interrupted(gone)
    study.tell(gone, state=T.TrialState.FAIL)
    views = [T.view(t) for t in study.trials]
    assert views[1].cached_from == 0 and views[1].score == 0.3 and views[1].items() == {"legal": [True]}
    assert (views[2].error, views[2].traceback, views[2].attempts, views[2].counts) == ("boom", "tb", 3, True)
    assert views[3].interrupted and not views[3].counts and views[3].dtype is None


def test_study_facts_are_recorded_and_read_back():
    study = _study()
    T.record_study(study, campaign={"name": "c", "seed": 1}, num_layers=4, objectives=["score"])
    assert T.campaign_attr(study) == {"name": "c", "seed": 1}
    assert T.recorded_num_layers(study) == 4 and T.recorded_objectives(study) == ["score"]
    lists = T.ItemLists(study)
    lists.check("stage1", {"legal": ["a", "b"]})
    assert T.item_lists(study) == {"stage1": {"legal": ["a", "b"]}}
    assert T.item_groups(study) == {}                 # no twin groups given: none stored
    lists.check("final", {"legal": ["a", "b", "c"]}, {"legal": ("f1", "f1", "")})
    assert T.item_groups(study) == {"final": {"legal": ["f1", "f1", ""]}}
    lists.check("final", {"legal": ["a", "b", "c"]}, {"legal": ("x", "y", "z")})   # stored once
    assert T.item_groups(study) == {"final": {"legal": ["f1", "f1", ""]}}
    with pytest.raises(SchedulerError, match="differ"):
        T.ItemLists(study).check("stage1", {"legal": ["b", "a"]})


def _done(number: int, start: float, end: float, *, state=optuna.trial.TrialState.COMPLETE, **attrs):
    """A finished trial whose Optuna clocks read ``start`` and ``end`` seconds after a fixed time."""
    t0 = dt.datetime(2026, 1, 1)
    return optuna.trial.FrozenTrial(
        number=number, state=state, value=0.5 if state == optuna.trial.TrialState.COMPLETE else None,
        datetime_start=t0 + dt.timedelta(seconds=start), datetime_complete=t0 + dt.timedelta(seconds=end),
        params={}, distributions={}, user_attrs=attrs, system_attrs={}, intermediate_values={},
        trial_id=number)


def test_throughput_counts_trials_that_count_between_the_first_ask_and_the_last_tell():
    trials = [_done(0, 0, 600, eval_seconds=100.0), _done(1, 300, 1200, eval_seconds=200.0),
              _done(2, 900, 1800, state=optuna.trial.TrialState.PRUNED),
              _done(3, 0, 7200, state=optuna.trial.TrialState.FAIL, interrupted=True)]   # re-run: not counted
    rate = T.throughput(trials)
    assert rate.trials == 3 and rate.span_s == 1800.0 and rate.per_hour == 6.0
    assert rate.mean_trial_s == (600 + 900 + 900) / 3 and rate.mean_eval_s == 150.0
    assert T.throughput(trials[3:]) is None
