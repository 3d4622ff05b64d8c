"""The campaign's record: what a study and its trials hold, and how to read it.

The Optuna study *is* the campaign's record. Everything that writes it (the scheduler) and
everything that reads it (``status``, ``report``, ``export``, the demo's table) uses the names
and rules here, and nothing else: a reader never imports the driver, Ray or threads.

- Trial user attributes: the ``A_*`` names below.
- Study user attributes: the ``S_*`` names below.
- ``StageResult`` (defined in the Optuna-free ``search.stage``, re-exported here): what a
  worker sends back for one evaluation stage, and its per-item evidence.
- "Counts toward the budget": done (COMPLETE, PRUNED or FAIL) and not interrupted.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from search.stage import StageResult, pooled  # noqa: F401 - re-exported: the record's readers use them

TrialState = optuna.trial.TrialState
FrozenTrial = optuna.trial.FrozenTrial

# -- trial user attributes ---------------------------------------------------------------------
A_RECIPE = "recipe"               # the mergekit-compatible recipe YAML
A_DIGEST = "recipe_digest"
A_BASELINE = "baseline"           # "uniform" or "model:<ref>" for the seeded baselines
A_DOMAINS = "domains"             # {domain: {acc, gold_prob, n}} of the final stage
A_SCORE = "score"                 # weighted fitness of the final stage
A_STAGE1 = "stage1_score"
A_ITEMS = "items"                 # {domain: bit string} of the final stage (see evals.stats)
A_STAGE1_ITEMS = "stage1_items"   # {domain: bit string} of stage 1
A_PRUNE = "prune_decision"        # why stage 1 did or did not stop the trial
A_MATERIALIZE = "materialize_seconds"
A_EVAL = "eval_seconds"
A_WORKER = "worker"
A_THREADS = "torch_threads"       # the worker's CPU threads: CPU matmuls round by their split
A_ERROR = "error"
A_TRACEBACK = "traceback"
A_INTERRUPTED = "interrupted"
A_CACHED = "cached_from"
A_START = "started_at"
A_END = "finished_at"
A_ATTEMPTS = "attempts"

# -- study user attributes ---------------------------------------------------------------------
S_CAMPAIGN = "campaign"           # the campaign as given, storage credentials masked
S_NUM_LAYERS = "num_layers"
S_OBJECTIVES = "objective_names"
S_ITEM_LISTS = "item_lists"       # {"stage1"|"final": {domain: [item ids]}}, stored once per study

DONE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# -- writing the record (the scheduler) ---------------------------------------------------------

def record_run(trial: optuna.trial.Trial, *, domains: Mapping[str, Mapping[str, float]], materialize_s: float,
               eval_s: float, worker: int, attempts: int, started: float, threads: int | None = None) -> None:
    trial.set_user_attr(A_DOMAINS, {d: dict(v) for d, v in domains.items()})
    trial.set_user_attr(A_MATERIALIZE, round(materialize_s, 4))
    trial.set_user_attr(A_EVAL, round(eval_s, 4))
    trial.set_user_attr(A_WORKER, worker)
    trial.set_user_attr(A_ATTEMPTS, attempts)
    trial.set_user_attr(A_START, started)
    trial.set_user_attr(A_END, time.time())
    if threads:
        trial.set_user_attr(A_THREADS, threads)


def record_failure(trial: optuna.trial.Trial, reason: str, *, traceback: str | None, worker: int,
                   attempts: int) -> None:
    trial.set_user_attr(A_ERROR, reason)
    if traceback:
        trial.set_user_attr(A_TRACEBACK, traceback)
    trial.set_user_attr(A_ATTEMPTS, attempts)
    trial.set_user_attr(A_WORKER, worker)


def record_cached(trial: optuna.trial.Trial, src: FrozenTrial) -> None:
    """``trial`` has the recipe ``src`` scored: it carries ``src``'s scores and evidence."""
    trial.set_user_attr(A_CACHED, src.number)
    for key in (A_DOMAINS, A_SCORE, A_STAGE1, A_ITEMS, A_STAGE1_ITEMS):
        if key in src.user_attrs:
            trial.set_user_attr(key, src.user_attrs[key])


def check_item_lists(study: optuna.Study, stage: str, item_ids: Mapping[str, Sequence[str]]) -> None:
    """The items of each stage are stored once per study (``S_ITEM_LISTS``); every later result,
    a resumed campaign's included, must have scored the same items in the same order."""
    from search.errors import SchedulerError

    lists = dict(study.user_attrs.get(S_ITEM_LISTS) or {})
    now = {d: list(ids) for d, ids in item_ids.items()}
    if stage not in lists:
        lists[stage] = now
        study.set_user_attr(S_ITEM_LISTS, lists)
    elif lists[stage] != now:
        raise SchedulerError(f"the {stage} items scored now differ from those this study began with "
                             "(data directory, suite or limit changed): resume with the same data, "
                             "or start a new campaign")


# -- reading the record ------------------------------------------------------------------------

def interrupted(t: FrozenTrial) -> bool:
    return bool(t.user_attrs.get(A_INTERRUPTED))


def counts_toward_budget(t: FrozenTrial) -> bool:
    """The one rule: a trial counts when it is done and was not interrupted (re-run)."""
    return t.state in DONE and not interrupted(t)


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if counts_toward_budget(t)]


def counted(trials: Sequence[FrozenTrial], state: TrialState) -> list[FrozenTrial]:
    """Trials in ``state`` that count (interrupted ones were re-run and are not shown)."""
    return [t for t in trials if t.state == state and not interrupted(t)]


def scalar(t: FrozenTrial) -> float | None:
    """The trial's weighted score (also for multi-objective studies), None unless COMPLETE."""
    if t.state != TrialState.COMPLETE:
        return None
    return float(t.user_attrs.get(A_SCORE, t.values[0]))


def best_trials(study: optuna.Study, k: int = 5) -> list[FrozenTrial]:
    done = [t for t in study.get_trials(deepcopy=False) if scalar(t) is not None]
    return sorted(done, key=lambda t: -scalar(t))[:k]


def baselines(study: optuna.Study) -> dict[str, FrozenTrial]:
    """The first COMPLETE trial of each baseline, by baseline name."""
    out: dict[str, FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        name = t.user_attrs.get(A_BASELINE)
        if name and t.state == TrialState.COMPLETE and name not in out:
            out[name] = t
    return out


def baseline_label(name: str) -> str:
    return name.split("/")[-1] if name.startswith("model:") else name


def trial_label(t: FrozenTrial) -> str:
    base = t.user_attrs.get(A_BASELINE)
    return f"#{t.number}" if base is None else f"#{t.number} {baseline_label(base)}"


def domains_of(t: FrozenTrial) -> dict[str, dict[str, float]]:
    return dict(t.user_attrs.get(A_DOMAINS) or {})


def item_bits(t: FrozenTrial, *, stage1: bool = False) -> dict[str, list[bool]]:
    """The trial's per-item correctness by domain (empty for trials scored before it was kept)."""
    from evals.stats import decode_bits

    raw = t.user_attrs.get(A_STAGE1_ITEMS if stage1 else A_ITEMS) or {}
    return {d: decode_bits(s) for d, s in raw.items()}


def encode_items(items: Mapping[str, Sequence[bool]]) -> dict[str, str]:
    from evals.stats import encode_bits

    return {d: encode_bits(list(v)) for d, v in items.items()}


def campaign_attr(study: optuna.Study) -> dict[str, Any]:
    return dict(study.user_attrs.get(S_CAMPAIGN) or {})
