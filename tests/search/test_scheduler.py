"""The scheduler's policies, driven by a fake executor and by the local executor (threads
running model-free fake workers): no Ray, no models, milliseconds each."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import pytest

from search import pruning
from search import trials as T
from search.errors import SchedulerError
from search.scheduler import MAX_ATTEMPTS, Event, Job, Scheduler
from tests.search.workers import RecordingLocalExecutor

optuna.logging.set_verbosity(optuna.logging.WARNING)


@dataclass(frozen=True)
class Recipe:
    key: str

    def digest(self) -> str:
        return self.key

    def to_yaml(self) -> str:
        return f"key: {self.key}\n"


class Space:
    """One parameter; its value rounded to ``grid`` decimals is the recipe (so genomes can repeat)."""

    def __init__(self, grid: int = 6):
        self.grid = grid

    def param_names(self) -> list[str]:
        return ["x"]

    def distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        return {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}

    def to_recipe(self, params: dict[str, float]) -> Recipe:
        return Recipe(f"{params['x']:.{self.grid}f}")


Outcome = Callable[[Job], "T.StageResult | str"]   # a str: the worker died with that error


class FakeExecutor:
    """Runs submitted stages in order; hands a finished worker its next job as Ray's does."""

    def __init__(self, n_workers: int, outcome: Outcome):
        self.n_workers = n_workers
        self.outcome = outcome
        self.queue: collections.deque[Job] = collections.deque()
        self.handoff = None
        self.replaced: list[int] = []
        self.submitted: list[tuple[int, int, int]] = []   # (trial number, stage, worker)
        self.handed = 0
        self._busy_once = False

    def start(self, handoff) -> None:
        self.handoff = handoff

    def submit(self, job: Job) -> None:
        self.submitted.append((job.trial.number, job.stage, job.worker))
        self.queue.append(job)

    def next_event(self, timeout: float) -> Event | None:
        if not self.queue:
            return None
        if timeout == 0 and not self._busy_once:   # a stage takes time: a poll finds it running
            self._busy_once = True
            return None
        self._busy_once = False
        job = self.queue.popleft()
        out = self.outcome(job)
        if isinstance(out, str):
            return Event(job, error=out)
        handed = False
        if out.final or out.failed:
            nxt = self.handoff(job.worker)
            if nxt is not None:
                self.submit(nxt)
                self.handed += 1
                handed = True
        return Event(job, result=out, handed=handed)

    def replace_worker(self, worker: int) -> None:
        self.replaced.append(worker)

    def close(self) -> None:
        pass


EXECUTORS = {"fake": FakeExecutor, "local": RecordingLocalExecutor}
_kind = ["fake"]
_made: list = []


@pytest.fixture(autouse=True, params=sorted(EXECUTORS))
def executor_kind(request):
    """Each test runs on the fake executor and on the local one; the local one's threads end."""
    _kind[0] = request.param
    yield request.param
    for ex in _made:
        ex.close()
    _made.clear()


def executor(n_workers: int, outcome: Outcome):
    ex = EXECUTORS[_kind[0]](n_workers, outcome)
    _made.append(ex)
    return ex


def result(job: Job, *, score: float | None = None, final: bool = True,
           items: list[bool] | None = None) -> T.StageResult:
    s = float(job.trial.params["x"]) if score is None else score
    items = items if items is not None else [True, False]
    return T.StageResult(worker=job.worker, stage=job.stage, final=final, score=s, objectives=(s,),
                         domains={"legal": {"acc": s, "gold_prob": 0.5, "n": len(items)}},
                         items={"legal": tuple(items)},
                         item_ids={"legal": tuple(f"q{i}" for i in range(len(items)))})


def new_study(seed: int = 0) -> tuple[optuna.Study, optuna.storages.InMemoryStorage]:
    storage = optuna.storages.InMemoryStorage()
    return optuna.create_study(storage=storage, study_name="s", direction="maximize",
                               sampler=optuna.samplers.RandomSampler(seed=seed)), storage


def scheduler(outcome: Outcome, *, budget: int, workers: int = 2, seed: int = 0, **kw):
    study, storage = new_study(seed)
    ex = executor(workers, outcome)
    return Scheduler(study=study, storage=storage, space=kw.pop("space", Space()), executor=ex,
                     budget=budget, **kw), ex, study


def states(study: optuna.Study) -> collections.Counter:
    return collections.Counter(t.state.name for t in study.get_trials())


def test_budget_is_met_exactly_and_nothing_is_left_running():
    sched, ex, study = scheduler(lambda j: result(j), budget=7, workers=3)
    sched.prefill()
    sched.run()
    assert len(T.finished_trials(study)) == 7
    assert states(study) == {"COMPLETE": 7}
    assert not sched.live and not sched.running and sorted(sched.free) == [0, 1, 2]


def test_trials_are_asked_ahead_and_handed_to_a_finishing_worker_at_once():
    sched, ex, study = scheduler(lambda j: result(j), budget=6, workers=2)
    sched.prefill()
    assert len(sched.ready) == 2 and len(study.get_trials()) == 2   # one per worker, before any runs
    sched.run()
    # every trial after the first two reached its worker through the hand-off, not the loop
    assert ex.handed >= 3
    assert states(study) == {"COMPLETE": 6}


def test_a_recipe_scored_before_is_told_from_the_cache():
    sched, ex, study = scheduler(lambda j: result(j), budget=5, workers=1, space=Space(grid=0))
    sched.prefill()
    sched.run()
    done = study.get_trials()
    cached = [t for t in done if t.user_attrs.get(T.A_CACHED) is not None]
    # with x rounded to 0 decimals there are two recipes; everything else is a cache hit
    evaluated = {n for n, _, _ in ex.submitted}
    assert len(evaluated) == len(done) - len(cached) <= 2 and cached
    for t in cached:
        src = done[t.user_attrs[T.A_CACHED]]
        assert t.value == src.value and t.user_attrs[T.A_ITEMS] == src.user_attrs[T.A_ITEMS]
    assert len(T.finished_trials(study)) == 5


def test_duplicates_of_a_running_recipe_wait_for_its_result():
    study, storage = new_study()
    for _ in range(3):
        study.enqueue_trial({"x": 0.5})
    ex = executor(3, lambda j: result(j))
    sched = Scheduler(study=study, storage=storage, space=Space(), executor=ex, budget=3)
    sched.prefill()
    sched.run()
    assert [n for n, _, _ in ex.submitted] == [0]     # the two copies were never evaluated
    trials = study.get_trials()
    assert [t.user_attrs.get(T.A_CACHED) for t in trials] == [None, 0, 0]
    assert states(study) == {"COMPLETE": 3}


def test_a_failed_recipe_runs_its_waiting_duplicate_for_real():
    study, storage = new_study()
    for _ in range(2):
        study.enqueue_trial({"x": 0.5})
    calls = []

    def outcome(job):
        calls.append(job.trial.number)
        if len(calls) == 1:
            return T.StageResult(worker=job.worker, stage=1, error="ValueError: boom", traceback="tb")
        return result(job)

    ex = executor(2, outcome)
    sched = Scheduler(study=study, storage=storage, space=Space(), executor=ex, budget=2)
    sched.prefill()
    sched.run()
    assert calls == [0, 1]
    t0, t1 = study.get_trials()
    assert t0.state.name == "FAIL" and t0.user_attrs[T.A_ERROR] == "ValueError: boom"
    assert t0.user_attrs[T.A_TRACEBACK] == "tb"
    assert t1.state.name == "COMPLETE" and t1.user_attrs.get(T.A_CACHED) is None


def test_a_worker_death_replaces_the_worker_and_reruns_the_trial():
    deaths = collections.Counter()

    def outcome(job):
        if job.trial.number == 0 and deaths[0] == 0:
            deaths[0] += 1
            return "ActorDiedError"
        return result(job)

    sched, ex, study = scheduler(outcome, budget=3, workers=2)
    sched.prefill()
    sched.run()
    assert ex.replaced == [ex.submitted[0][2]]
    first = study.get_trials()[0]
    assert first.state.name == "COMPLETE" and first.user_attrs[T.A_ATTEMPTS] == 2
    assert len(T.finished_trials(study)) == 3


def test_a_trial_whose_worker_keeps_dying_fails_and_the_campaign_goes_on():
    sched, ex, study = scheduler(lambda j: "ActorDiedError" if j.trial.number == 0 else result(j),
                                 budget=3, workers=1)
    sched.prefill()
    sched.run()
    first = study.get_trials()[0]
    assert first.state.name == "FAIL" and first.user_attrs[T.A_ATTEMPTS] == MAX_ATTEMPTS
    assert len(ex.replaced) == MAX_ATTEMPTS
    assert len(T.finished_trials(study)) == 3


def test_resume_requeues_interrupted_trials_and_keeps_the_budget_exact():
    study, storage = new_study()
    sched = Scheduler(study=study, storage=storage, space=Space(), executor=executor(1, lambda j: result(j)),
                      budget=4)
    sched.prefill()
    sched.run()
    # a driver killed -9 mid-run: two trials asked and never told, one of them half-sampled
    live = study.ask({"x": optuna.distributions.FloatDistribution(0.0, 1.0)})
    study.ask()   # asked, no parameters yet
    study2 = optuna.load_study(study_name="s", storage=storage, sampler=optuna.samplers.RandomSampler(seed=1))
    ex = executor(2, lambda j: result(j))
    again = Scheduler(study=study2, storage=storage, space=Space(), executor=ex, budget=6)
    again.requeue_interrupted()
    again.prefill()
    again.run()
    trials = study2.get_trials()
    interrupted = [t for t in trials if T.interrupted(t)]
    assert {t.number for t in interrupted} == {4, 5} and all(t.state.name == "FAIL" for t in interrupted)
    rerun = [t for t in trials if t.number > 5 and t.params == live.params]
    assert len(rerun) == 1 and rerun[0].state.name == "COMPLETE"   # the complete one ran again
    assert len(T.finished_trials(study2)) == 6
    assert not any(t.state.name == "RUNNING" for t in trials)


def test_resume_refuses_a_study_whose_items_changed():
    study, storage = new_study()
    Scheduler(study=study, storage=storage, space=Space(), budget=2,
              executor=executor(1, lambda j: result(j))).run()
    other = executor(1, lambda j: result(j, items=[True, True, False]))
    with pytest.raises(SchedulerError, match="items scored now differ"):
        Scheduler(study=study, storage=storage, space=Space(), executor=other, budget=4).run()


def test_interrupt_all_fails_and_requeues_what_was_asked():
    def outcome(job):
        if job.trial.number == 2:
            raise KeyboardInterrupt
        return result(job)

    sched, ex, study = scheduler(outcome, budget=10, workers=2)
    sched.prefill()
    with pytest.raises(KeyboardInterrupt):
        sched.run()
    sched.interrupt_all()
    trials = study.get_trials()
    assert not any(t.state.name == "RUNNING" for t in trials)
    interrupted = [t for t in trials if T.interrupted(t)]
    assert interrupted and all(t.state.name == "FAIL" for t in interrupted)
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert len(waiting) == len(interrupted)   # each queued again for --resume


def test_timeout_stops_handing_out_and_requeues_what_was_asked_ahead():
    now = [0.0]
    sched, ex, study = scheduler(lambda j: (now.__setitem__(0, now[0] + 10), result(j))[1], budget=50,
                                 workers=1, timeout=25, clock=lambda: now[0])
    sched.prefill()
    sched.run()
    done = T.finished_trials(study)
    assert 2 <= len(done) <= 4
    assert not any(t.state.name == "RUNNING" for t in study.get_trials())


# -- staged evaluation and pruning -----------------------------------------------------------

def test_the_issue_example_is_not_pruned():
    earlier = [0.025, 0.025, 0.025, 0.137, 0.138, 0.250]
    d = pruning.decide(0.137, [False] * 10, earlier=earlier, incumbent_correct=[True] * 10, incumbent=5)
    assert not d.prune and d.threshold == pytest.approx(0.025)
    assert "not in the bottom quarter" in d.reason


def test_bottom_quarter_and_significantly_worse_is_pruned():
    earlier = [0.5, 0.6, 0.7, 0.8]
    d = pruning.decide(0.1, [False] * 6, earlier=earlier, incumbent_correct=[True] * 6, incumbent=3)
    assert d.prune and d.p_value == pytest.approx(0.5 ** 6) and d.incumbent == 3


def test_bottom_quarter_but_not_significant_is_kept():
    earlier = [0.5, 0.6, 0.7, 0.8]
    # 4 discordant items all against the candidate: p = 1/16 > 0.05
    d = pruning.decide(0.1, [False] * 4 + [True] * 6, earlier=earlier,
                       incumbent_correct=[True] * 10, incumbent=3)
    assert not d.prune and d.p_value == pytest.approx(1 / 16)


def test_too_few_earlier_scores_or_no_incumbent_never_prunes():
    assert not pruning.decide(0.0, [False] * 9, earlier=[0.5, 0.6], incumbent_correct=[True] * 9).prune
    assert not pruning.decide(0.0, [False] * 9, earlier=[0.5] * 6, incumbent_correct=None).prune


def test_staged_campaign_prunes_only_with_evidence_and_records_the_decision():
    """Synthetic per-item results: trial quality is x; stage 1 has 12 items, the full stage 24
    (the first 12 are stage 1's: the incumbent is ranked on the other 12)."""
    def outcome(job):
        x = float(job.trial.params["x"])
        n = 24 if job.stage == 2 else 12
        items = [i < round(x * n) for i in range(n)]
        return result(job, score=sum(items) / n, final=job.stage == 2, items=items)

    sched, ex, study = scheduler(outcome, budget=40, workers=2)
    sched.prefill()
    sched.run()
    trials = study.get_trials()
    assert len(T.finished_trials(study)) == 40
    order = sorted((t for t in trials if T.A_STAGE1 in t.user_attrs), key=lambda t: t.number)
    earlier: list[float] = []
    pruned = 0
    for t in order:
        decision = t.user_attrs[T.A_PRUNE]
        if t.state.name == "PRUNED":
            pruned += 1
            # never above the 25th percentile of the stage-1 scores recorded before it ...
            assert len(earlier) >= pruning.MIN_EARLIER
            assert t.user_attrs[T.A_STAGE1] < pruning.np.percentile(earlier, 25)
            # ... and significantly worse than the incumbent on the same items
            inc = trials[decision["incumbent"]]
            mine = T.item_bits(t, stage1=True)["legal"]
            theirs = T.item_bits(inc, stage1=True)["legal"]
            wins = sum(a and not b for a, b in zip(mine, theirs))
            losses = sum(b and not a for a, b in zip(mine, theirs))
            from evals.stats import mcnemar_exact
            assert mcnemar_exact(wins, losses, "less") <= 0.05
        else:
            assert not decision["prune"]   # an audited would-be prune is scored in full, not pruned
        earlier.append(t.user_attrs[T.A_STAGE1])
    assert pruned > 0
    full = [s for n, s, _ in ex.submitted if s == 2]
    assert len(full) == sum(t.state.name == "COMPLETE" for t in trials)


def test_a_stop_request_stops_at_a_safe_point_and_nothing_is_left_running():
    holder = {}

    def outcome(job):
        if job.trial.number == 3:
            holder["sched"].request_stop("SIGTERM")   # as the signal handler does, mid-trial
        return result(job)

    sched, ex, study = scheduler(outcome, budget=20, workers=2)
    holder["sched"] = sched
    sched.prefill()
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        sched.run()
    sched.interrupt_all()
    trials = study.get_trials()
    assert not any(t.state.name == "RUNNING" for t in trials)
    # every asked trial is either recorded or interrupted and queued again; none half-sampled
    for t in trials:
        assert t.state.name in ("COMPLETE", "WAITING") or T.interrupted(t)
        if T.interrupted(t):
            assert "x" in t.params
    assert len(T.finished_trials(study)) < 20


def _staged_outcome(job):
    """Quality x; stage 1 scores 12 items, the full stage 24 (the incumbent is ranked on the other 12)."""
    x = float(job.trial.params["x"])
    n = 24 if job.stage == 2 else 12
    items = [i < round(x * n) for i in range(n)]
    return result(job, score=sum(items) / n, final=job.stage == 2, items=items)


def test_the_pruning_audit_scores_would_be_prunes_in_full_and_reports_them():
    from search import pruning_audit

    sched, _, study = scheduler(_staged_outcome, budget=40, workers=2, prune_audit=0.0)
    sched.prefill()
    sched.run()
    pruned = {t.number for t in study.get_trials() if t.state.name == "PRUNED"}
    assert pruned

    sched, _, study = scheduler(_staged_outcome, budget=40, workers=2, prune_audit=1.0)
    sched.prefill()
    sched.run()
    trials = study.get_trials()
    audited = [t for t in trials if t.user_attrs.get(T.A_PRUNE, {}).get("audited")]
    assert not any(t.state.name == "PRUNED" for t in trials)    # every would-be prune was audited
    assert audited and all(t.state.name == "COMPLETE" and not t.user_attrs[T.A_PRUNE]["prune"] for t in audited)
    s = pruning_audit.summary(study)
    assert s["pruned"] == 0 and s["audited"] == len(audited)
    # a would-be prune here is a lower x than its incumbent, so it is worse on the other 12 items too
    assert s["false_prunes"] == 0 and s["false_prune_rate"] == 0.0
    text = "\n".join(pruning_audit.lines(s))
    assert f"pruning audit: {len(audited)} would-be prunes scored in full" in text and "power of stage 1" in text


def test_twin_groups_the_worker_reports_are_counted_once_by_pruning_and_its_power():
    """Stage 1 asks 12 facts twice (24 items, answered alike): each decision counts 12 units,
    every prune is significant on one copy of the facts, and the power is quoted on 12 units."""
    from evals.stats import mcnemar_exact
    from search import pruning_audit

    def outcome(job):
        n = 24 if job.stage == 2 else 12
        x = float(job.trial.params["x"])
        facts = [i < round(x * n) for i in range(n)]
        items = [b for b in facts for _ in (0, 1)]
        r = result(job, score=sum(facts) / n, final=job.stage == 2, items=items)
        groups = {"legal": tuple(f"f{i}" for i in range(n) for _ in (0, 1))}
        return dataclasses.replace(r, item_groups=groups)

    sched, _, study = scheduler(outcome, budget=40, workers=2, prune_audit=0.0)
    sched.prefill()
    sched.run()
    decisions = [t.user_attrs[T.A_PRUNE] for t in study.get_trials() if T.A_PRUNE in t.user_attrs]
    tested = [d for d in decisions if d.get("n")]
    assert tested and all((d["n"], d["units"]) == (24, 12) for d in tested)
    pruned = [t for t in study.get_trials() if t.state.name == "PRUNED"]
    assert pruned
    trials = study.get_trials()
    for t in pruned:
        mine = T.item_bits(t, stage1=True)["legal"][::2]
        theirs = T.item_bits(trials[t.user_attrs[T.A_PRUNE]["incumbent"]], stage1=True)["legal"][::2]
        wins = sum(a and not b for a, b in zip(mine, theirs))
        losses = sum(b and not a for a, b in zip(mine, theirs))
        assert mcnemar_exact(wins, losses, "less") <= 0.05
    s = pruning_audit.summary(study)
    assert (s["stage1_items"], s["stage1_units"]) == (24, 12)
    assert s["power"] == pytest.approx(pruning_audit.stage1_power(12, s["disagreement_rate"]))
    assert "24 items, 12 independent units" in "\n".join(pruning_audit.lines(s))


def test_a_baseline_is_never_pruned_by_the_scheduler():
    def outcome(job):
        if T.baseline_name(job.trial) == "model:bad":
            n = 24 if job.stage == 2 else 12
            return result(job, score=0.0, final=job.stage == 2, items=[False] * n)
        return _staged_outcome(job)

    sched, _, study = scheduler(outcome, budget=30, workers=1, prune_audit=0.0)
    sched.prefill()
    sched.run()          # some trials first, so the percentile and an incumbent exist
    T.enqueue_baseline(study, {"x": 0.0}, "model:bad")
    sched2 = Scheduler(study=study, storage=study._storage, space=Space(), executor=executor(1, outcome),
                       budget=31, prune_audit=0.0)
    sched2.prefill()
    sched2.run()
    bad = [t for t in study.get_trials() if T.baseline_name(t) == "model:bad"]
    assert bad and bad[0].state.name == "COMPLETE"
    assert "baselines are never pruned" in bad[0].user_attrs[T.A_PRUNE]["reason"]


def test_stage_2_is_submitted_before_stage_1_is_recorded_and_without_a_scan_of_the_study():
    """The worker goes on at once: at its stage-2 submit nothing of stage 1 is written yet, and the
    stage-1 path (prune decision included) reads no trial list back from storage."""
    seen_at_submit = []

    class Watching(FakeExecutor):
        def submit(self, job: Job) -> None:
            if job.stage == 2:
                sid = storage.get_study_id_from_name(study.study_name)
                frozen = all_trials(sid, deepcopy=False)[job.trial.number]   # not counted as a scan
                seen_at_submit.append(T.view(frozen).stage1_score)
            super().submit(job)

    def outcome(job):
        return result(job, final=job.stage == 2, items=[job.trial.params["x"] > 0.5, True, False])

    study, storage = new_study(3)
    sched = Scheduler(study=study, storage=storage, space=Space(), executor=Watching(2, outcome), budget=12)
    scans = {"n": 0, "stage1": []}
    all_trials = storage.get_all_trials

    def counting(*a, **k):
        scans["n"] += 1
        return all_trials(*a, **k)

    handle = sched.handle

    def watched(ev):
        before = scans["n"]
        handle(ev)
        if ev.result is not None and not ev.result.final:
            scans["stage1"].append(scans["n"] - before)

    storage.get_all_trials = counting
    sched.handle = watched
    sched.prefill()
    sched.run()
    assert seen_at_submit and seen_at_submit == [None] * len(seen_at_submit)
    assert len(scans["stage1"]) == 12 and set(scans["stage1"]) == {0}
    # and stage 1 is recorded all the same, for pruned and continued trials alike
    views = [T.view(t) for t in study.get_trials()]
    assert all(v.stage1_score is not None and v.prune is not None for v in views)
    assert len(T.finished_trials(study)) == 12


def test_the_in_memory_incumbent_is_the_one_the_record_gives():
    """The scheduler ranks the incumbent as it goes; a resumed one reads it from the study: same trial,
    ranked on the 12 items stage 1 does not score, not on the full score."""
    sched, _, study = scheduler(_staged_outcome, budget=30, workers=2, prune_audit=0.0)
    sched.prefill()
    sched.run()
    number, key, bits = pruning.incumbent(study)
    assert sched.incumbent[0] == number and sched.incumbent[1] == pytest.approx(key)
    assert bits == T.item_bits(study.trials[number], stage1=True)
    mask = pruning.outside_stage1(study)
    assert mask == {"legal": [False] * 12 + [True] * 12}
