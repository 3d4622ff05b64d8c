"""The campaign's record: what a study and its trials hold, and how to read it.

The Optuna study *is* the campaign's record. This module is its only writer and reader of
attributes: the scheduler and the driver write through the ``record_*`` functions (one per
transition of a trial or a study), and every reader (``status``, ``report``, ``figures``,
``export``, the demo, ``perf/``) reads through ``view`` (a frozen ``TrialView``) and the
functions below, never by attribute name. A reader never imports the driver, Ray or threads.

- Trial user attributes: the ``A_*`` names below.
- Study user attributes: the ``S_*`` names below.
- ``StageResult`` (defined in the Optuna-free ``search.stage``, re-exported here): what a
  worker sends back for one evaluation stage, and its per-item evidence.
- "Counts toward the budget": done (COMPLETE, PRUNED or FAIL) and not interrupted.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
A_DTYPE = "dtype"                 # the live model's compute dtype (the export's proof uses the same)
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
S_ITEM_GROUPS = "item_groups"     # {"stage1"|"final": {domain: [twin group]}}, same order; only if any
S_SOURCES = "sources"             # [{ref, path, adapter, files: {name: sha256}}] (search.model_identity)
S_CACHE_FROM = "cache_from_trial" # the genome cache reuses scores of trials numbered from here on

DONE = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# -- writing the record: trials (the scheduler) -------------------------------------------------

def enqueue_baseline(study: optuna.Study, params: Mapping[str, float], name: str | None) -> None:
    """Queue ``params`` as the next trial; ``name`` marks it as a seeded baseline (None: not one)."""
    study.enqueue_trial(dict(params), user_attrs={} if name is None else {A_BASELINE: name})


def record_asked(trial: optuna.trial.Trial, *, digest: str, recipe_yaml: str) -> None:
    """A trial was asked and its genome made into a recipe."""
    trial.set_user_attr(A_DIGEST, digest)
    trial.set_user_attr(A_RECIPE, recipe_yaml)


def record_stage1(trial: optuna.trial.Trial, *, score: float, items: Mapping[str, Sequence[bool]],
                  decision: Mapping[str, Any]) -> None:
    """Stage 1's score and items, reported as the trial's step-0 value, and the prune decision."""
    trial.set_user_attr(A_STAGE1, score)
    trial.set_user_attr(A_STAGE1_ITEMS, encode_items(items))
    trial.set_user_attr(A_PRUNE, dict(decision))
    trial.report(score, 0)


def record_final(trial: optuna.trial.Trial, *, score: float, items: Mapping[str, Sequence[bool]]) -> None:
    """The full stage's weighted score and per-item correctness (before the tell)."""
    trial.set_user_attr(A_SCORE, score)
    trial.set_user_attr(A_ITEMS, encode_items(items))


def record_run(trial: optuna.trial.Trial, *, domains: Mapping[str, Mapping[str, float]], materialize_s: float,
               eval_s: float, worker: int, attempts: int, started: float, threads: int | None = None,
               dtype: str | None = None) -> None:
    """Where and how long the trial ran (its last stage's domains included)."""
    trial.set_user_attr(A_DOMAINS, {d: dict(v) for d, v in domains.items()})
    trial.set_user_attr(A_MATERIALIZE, round(materialize_s, 4))
    trial.set_user_attr(A_EVAL, round(eval_s, 4))
    trial.set_user_attr(A_WORKER, worker)
    trial.set_user_attr(A_ATTEMPTS, attempts)
    trial.set_user_attr(A_START, started)
    trial.set_user_attr(A_END, time.time())
    if threads:
        trial.set_user_attr(A_THREADS, threads)
    if dtype:
        trial.set_user_attr(A_DTYPE, dtype)


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


def record_interrupted(trial: optuna.trial.Trial) -> None:
    """The trial was stopped before its result: it does not count and is run again."""
    trial.set_user_attr(A_INTERRUPTED, True)


def record_interrupted_number(storage: optuna.storages.BaseStorage, study: optuna.Study, number: int) -> None:
    """``record_interrupted`` for a trial of an earlier driver (no ``Trial`` object for it)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, number),
                                A_INTERRUPTED, True)


def enqueue_again(study: optuna.Study, t: FrozenTrial | optuna.trial.Trial) -> None:
    """Queue an interrupted trial's parameters again, as the baseline it was (if one)."""
    enqueue_baseline(study, t.params, t.user_attrs.get(A_BASELINE))


# -- writing the record: the study (the driver) -------------------------------------------------

def record_study(study: optuna.Study, *, campaign: Mapping[str, Any], num_layers: int,
                 objectives: Sequence[str]) -> None:
    """A new study's facts: the campaign (credentials already masked), layers, objective names."""
    study.set_user_attr(S_CAMPAIGN, dict(campaign))
    study.set_user_attr(S_NUM_LAYERS, num_layers)
    study.set_user_attr(S_OBJECTIVES, list(objectives))


def record_sources(study: optuna.Study, sources: Sequence[Mapping[str, Any]]) -> None:
    """The identity of every model the campaign merges (``search.model_identity``)."""
    study.set_user_attr(S_SOURCES, [dict(m) for m in sources])


def record_cache_start(study: optuna.Study, number: int) -> None:
    """Scores of trials numbered below ``number`` are not reused for a recipe asked again (the
    models changed under them: ``--accept-changed-models``)."""
    study.set_user_attr(S_CACHE_FROM, int(number))


class ItemLists:
    """The items of each stage, stored once per study (``S_ITEM_LISTS``): every later result, a
    resumed campaign's included, must have scored the same items in the same order. The stored
    lists are read once and then kept in memory, so a check costs no storage round trip."""

    def __init__(self, study: optuna.Study):
        self.study = study
        self._lists: dict[str, dict[str, list[str]]] | None = None

    def check(self, stage: str, item_ids: Mapping[str, Sequence[str]],
              groups: Mapping[str, Sequence[str]] | None = None) -> None:
        """The stage's items are those stored (the first result's are stored, with their twin
        ``groups`` when any item has one: ``S_ITEM_GROUPS``, read by :func:`item_groups`)."""
        from search.errors import SchedulerError

        self.stored()
        now = {d: list(ids) for d, ids in item_ids.items()}
        if stage not in self._lists:
            self._lists[stage] = now
            self.study.set_user_attr(S_ITEM_LISTS, dict(self._lists))
            if groups and any(any(g) for g in groups.values()):
                known = item_groups(self.study)
                self.study.set_user_attr(S_ITEM_GROUPS, {**known, stage: {d: list(g) for d, g in groups.items()}})
        elif self._lists[stage] != now:
            raise SchedulerError(f"the {stage} items scored now differ from those this study began with "
                                 "(data directory, suite or limit changed): resume with the same data, "
                                 "or start a new campaign")

    def stored(self) -> dict[str, dict[str, list[str]]]:
        """The lists known so far, ``{"stage1"|"final": {domain: [ids]}}`` (read once)."""
        if self._lists is None:
            self._lists = item_lists(self.study)
        return self._lists


def item_groups(study: optuna.Study) -> dict[str, dict[str, list[str]]]:
    """Each stage's twin groups, ``{"stage1"|"final": {domain: [group]}}`` in the items' order
    ("" for an item on its own); empty when no item has a group (or a study from before)."""
    return dict(study.user_attrs.get(S_ITEM_GROUPS) or {})


def item_lists(study: optuna.Study) -> dict[str, dict[str, list[str]]]:
    """The study's stored item lists, ``{"stage1"|"final": {domain: [ids]}}`` (empty if none yet)."""
    return dict(study.user_attrs.get(S_ITEM_LISTS) or {})


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


def baseline_name(t: FrozenTrial | optuna.trial.Trial) -> str | None:
    """``"uniform"`` or ``"model:<ref>"`` for a seeded baseline, None for a searched trial."""
    return t.user_attrs.get(A_BASELINE)


def baselines(study: optuna.Study) -> dict[str, FrozenTrial]:
    """The first COMPLETE trial of each baseline, by baseline name."""
    out: dict[str, FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        name = baseline_name(t)
        if name and t.state == TrialState.COMPLETE and name not in out:
            out[name] = t
    return out


def baseline_label(name: str) -> str:
    return name.split("/")[-1] if name.startswith("model:") else name


def trial_label(t: FrozenTrial) -> str:
    base = baseline_name(t)
    return f"#{t.number}" if base is None else f"#{t.number} {baseline_label(base)}"


def domains_of(t: FrozenTrial) -> dict[str, dict[str, float]]:
    return dict(t.user_attrs.get(A_DOMAINS) or {})


def item_bits(t: FrozenTrial, *, stage1: bool = False) -> dict[str, list[bool]]:
    """The trial's per-item correctness by domain (empty for trials scored before it was kept)."""
    from evals.stats import decode_bits

    raw = t.user_attrs.get(A_STAGE1_ITEMS if stage1 else A_ITEMS) or {}
    return {d: decode_bits(s) for d, s in raw.items()}


def has_items(t: FrozenTrial, *, stage1: bool = False) -> bool:
    """Whether the trial kept its per-item correctness (of stage 1, or of the final stage)."""
    return bool(t.user_attrs.get(A_STAGE1_ITEMS if stage1 else A_ITEMS))


def encode_items(items: Mapping[str, Sequence[bool]]) -> dict[str, str]:
    from evals.stats import encode_bits

    return {d: encode_bits(list(v)) for d, v in items.items()}


def stage1_value(t: FrozenTrial) -> float | None:
    """The stage-1 score, or the reported step value of a trial recorded without it."""
    value = t.user_attrs.get(A_STAGE1)
    if value is None and t.intermediate_values:
        value = t.intermediate_values[max(t.intermediate_values)]
    return None if value is None else float(value)


@dataclass(frozen=True)
class TrialView:
    """One trial of the record, read-only and typed: what readers use instead of attribute names."""

    number: int
    state: TrialState
    values: tuple[float, ...] | None
    params: Mapping[str, Any]
    score: float | None                 # ``scalar``: the weighted score, None unless COMPLETE
    recipe: str | None
    digest: str | None
    baseline: str | None                # "uniform" / "model:<ref>", None for a searched trial
    label: str                          # "#7" or "#7 uniform"
    domains: Mapping[str, Mapping[str, float]]
    stage1_score: float | None          # as recorded (``stage1_value`` also reads older studies)
    prune: Mapping[str, Any] | None     # the prune decision (``pruning.PruneDecision.to_attr``)
    materialize_seconds: float | None
    eval_seconds: float | None
    started_at: float | None            # the worker's part: job start -> result recorded (epoch s)
    finished_at: float | None
    worker: int | None
    threads: int | None
    dtype: str | None
    error: str | None
    traceback: str | None
    interrupted: bool
    cached_from: int | None
    attempts: int | None
    frozen: FrozenTrial = field(repr=False, compare=False)

    def items(self, *, stage1: bool = False) -> dict[str, list[bool]]:
        return item_bits(self.frozen, stage1=stage1)

    @property
    def counts(self) -> bool:
        return counts_toward_budget(self.frozen)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def view(t: FrozenTrial) -> TrialView:
    a = t.user_attrs
    cached = a.get(A_CACHED)
    return TrialView(
        number=t.number, state=t.state, values=tuple(t.values) if t.values is not None else None,
        params=dict(t.params), score=scalar(t), recipe=a.get(A_RECIPE), digest=a.get(A_DIGEST),
        baseline=baseline_name(t), label=trial_label(t), domains=domains_of(t), stage1_score=_num(a.get(A_STAGE1)),
        prune=a.get(A_PRUNE), materialize_seconds=_num(a.get(A_MATERIALIZE)), eval_seconds=_num(a.get(A_EVAL)),
        started_at=_num(a.get(A_START)), finished_at=_num(a.get(A_END)), worker=a.get(A_WORKER),
        threads=a.get(A_THREADS), dtype=a.get(A_DTYPE), error=a.get(A_ERROR), traceback=a.get(A_TRACEBACK),
        interrupted=interrupted(t), cached_from=None if cached is None else int(cached),
        attempts=a.get(A_ATTEMPTS), frozen=t)


@dataclass(frozen=True)
class Throughput:
    trials: int           # trials that count, with both clocks
    span_s: float         # first ask -> last tell
    per_hour: float
    mean_trial_s: float   # ask -> tell, averaged
    mean_eval_s: float    # the worker's evaluation, averaged over trials that ran one


def throughput(trials: Sequence[FrozenTrial]) -> Throughput | None:
    """The one throughput definition, from Optuna's own clocks (``datetime_start`` at the ask,
    ``datetime_complete`` at the tell) over the trials that count. Why these clocks and not the
    ``started_at``/``finished_at`` attributes: Optuna sets them on every trial in every state
    (failed and cached ones, and studies of older brmerge versions, have no start/end attributes),
    and they cover the ask, queueing and tell that a user waits for too, not only the worker's part.
    None when no counted trial has both clocks."""
    counted_ = [t for t in trials if counts_toward_budget(t) and t.datetime_start and t.datetime_complete]
    if not counted_:
        return None
    times = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in counted_]
    span = max(b for _, b in times) - min(a for a, _ in times)
    evals = [v for v in (_num(t.user_attrs.get(A_EVAL)) for t in counted_) if v is not None]
    return Throughput(trials=len(times), span_s=span, per_hour=len(times) / span * 3600 if span > 0 else 0.0,
                      mean_trial_s=sum(b - a for a, b in times) / len(times),
                      mean_eval_s=sum(evals) / len(evals) if evals else 0.0)


# -- the study's facts -------------------------------------------------------------------------

def campaign_attr(study: optuna.Study) -> dict[str, Any]:
    return dict(study.user_attrs.get(S_CAMPAIGN) or {})


def recorded_num_layers(study: optuna.Study) -> int | None:
    n = study.user_attrs.get(S_NUM_LAYERS)
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def recorded_sources(study: optuna.Study) -> list[dict[str, Any]]:
    """The models' identities as recorded (empty for studies of older brmerge versions)."""
    return [dict(m) for m in study.user_attrs.get(S_SOURCES) or [] if isinstance(m, dict)]


def cache_start(study: optuna.Study) -> int:
    """The first trial number whose score the genome cache may reuse (0: all of them)."""
    n = study.user_attrs.get(S_CACHE_FROM)
    return n if isinstance(n, int) and not isinstance(n, bool) else 0


def recorded_objectives(study: optuna.Study) -> list[str]:
    return list(study.user_attrs.get(S_OBJECTIVES) or [])
