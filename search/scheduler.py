"""The campaign's policies, over an executor protocol: no Ray, no threads of its own.

``Scheduler`` asks Optuna for trials and tells it their results; an ``Executor`` runs trial
stages on workers (Ray in ``search.executor``; a fake in the tests). The scheduler owns:

- **budget**: the campaign stops at exactly ``budget`` trials that count (``trials.counts_toward_budget``);
- **ask-ahead**: up to ``lookahead`` trials asked before a worker needs one; the executor takes
  the next one through ``handoff`` the moment a worker finishes, without waiting for the tell;
- **duplicates and the genome cache**: a recipe already scored is told the earlier values; one
  being scored makes its duplicates wait for that result;
- **requeue**: a trial whose worker died runs again from stage 1 (``MAX_ATTEMPTS`` in all);
- **resume**: trials left RUNNING by a dead driver are marked interrupted and queued again;
- **staged evaluation**: stage 1, then ``search.pruning`` decides, then the full stage.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import optuna

from search import pruning
from search import trials as T
from search.protocol import Event, Executor, Job

__all__ = ["Event", "Executor", "Job", "MAX_ATTEMPTS", "Scheduler"]

MAX_ATTEMPTS = 3          # a trial whose worker dies this many times becomes a FAIL trial
LOOKAHEAD_PER_WORKER = 1  # trials asked ahead per worker


class Scheduler:
    def __init__(self, *, study: optuna.Study, storage: optuna.storages.BaseStorage, space: Any,
                 budget: int, executor: Executor | None = None, multi_objective: bool = False,
                 alpha: float = pruning.DEFAULT_ALPHA, prune_audit: float = pruning.DEFAULT_AUDIT,
                 timeout: float | None = None,
                 log: Callable[[str], None] = lambda m: None, on_done: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.time):
        self.study, self.storage, self.space = study, storage, space
        self.budget, self.multi, self.alpha = budget, multi_objective, alpha
        self.prune_audit = prune_audit
        self.timeout, self.log, self.on_done, self.clock = timeout, log, on_done, clock
        self.lock = threading.Lock()     # ``ready`` and ``running`` are shared with ``handoff``
        self.ready: collections.deque[Job] = collections.deque()
        self.running: dict[int, Job] = {}
        self.attach(executor)
        self.live: dict[int, Job] = {}   # every asked trial not yet recorded, by trial number
        self.waiting: dict[str, list[Job]] = {}
        self.hand_out = True
        self.stopping = False
        self._asking: optuna.trial.Trial | None = None
        self.stop_reason: str | None = None   # set by request_stop (a signal)
        views = [T.view(t) for t in study.get_trials(deepcopy=False)]
        self.n_done = sum(v.counts for v in views)
        cache_from = T.cache_start(study)   # earlier trials scored models that have since changed
        self.cache = {v.digest: v.number for v in views if v.digest and v.cached_from is None
                      and v.number >= cache_from and v.state in (T.TrialState.COMPLETE, T.TrialState.PRUNED)}
        self.stage1_scores = [v.stage1_score for v in views
                              if v.stage1_score is not None and v.cached_from is None]
        # the incumbent (best trial on the items outside stage 1, see ``pruning.incumbent``), kept
        # in memory so that the stage-1 path reads nothing back from storage
        number, key, bits = pruning.incumbent(study)
        self.weights = pruning.study_weights(study)       # the campaign's domain weights (None: equal)
        self.audit_seed = int(T.campaign_attr(study).get("seed") or 0)
        self.incumbent: tuple[int, float, dict[str, list[bool]] | None] | None = \
            None if number is None else (number, key, bits)
        self.item_lists = T.ItemLists(study)
        self.stage1_bits: dict[int, dict[str, list[bool]]] = {}   # stage-1 correctness of trials in stage 2
        self.started = clock()

    # -- set-up ------------------------------------------------------------------------------
    def attach(self, executor: Executor | None) -> None:
        """The workers (the study can be prepared before they exist)."""
        self.ex = executor
        n = executor.n_workers if executor is not None else 1
        self.lookahead = LOOKAHEAD_PER_WORKER * n
        self.free: list[int] = list(range(n))

    def seed_baselines(self, baselines: Sequence[tuple[str, dict[str, float]]]) -> None:
        for name, params in baselines:
            T.enqueue_baseline(self.study, params, name)

    def requeue_interrupted(self) -> None:
        """Trials a dead driver left RUNNING: interrupted (not counted), queued again."""
        genome = set(self.space.param_names())
        for t in self.study.get_trials(deepcopy=False, states=(T.TrialState.RUNNING,)):
            complete = set(t.params) == genome  # killed while being asked: nothing to re-run
            self._mark_interrupted(t.number)
            if complete:
                T.enqueue_again(self.study, t)
            self.log(f"trial {t.number} was running when the driver stopped: "
                     + ("queued again" if complete else "it was still being sampled; not re-run"))

    # -- asking ------------------------------------------------------------------------------
    def timed_out(self) -> bool:
        return self.timeout is not None and self.clock() - self.started > self.timeout

    def _ask_new(self) -> Job | None:
        """A new trial to run (cached recipes are told, duplicates wait), or None at the budget."""
        while not self.stopping and self.n_done + len(self.live) < self.budget:
            self.check_stop()
            self._asking = trial = self.study.ask(self.space.distributions())
            recipe = self.space.to_recipe(trial.params)
            job = Job(trial, recipe.digest(), recipe.to_yaml())
            T.record_asked(trial, digest=job.digest, recipe_yaml=job.recipe_yaml)
            self._asking = None
            if job.digest in self.cache:
                self._tell_cached(trial, self.cache[job.digest])
                continue
            scoring = any(j.digest == job.digest for j in self.live.values())  # its first copy is live
            self.live[trial.number] = job
            if scoring:
                self.waiting.setdefault(job.digest, []).append(job)
                continue
            return job
        return None

    def ask_ahead(self) -> bool:
        """Ask one more trial ahead if there is room; whether one was asked."""
        with self.lock:
            room = len(self.ready) < self.lookahead
        if not room or self.stopping or self.timed_out():
            return False
        job = self._ask_new()
        if job is None:
            return False
        with self.lock:
            self.ready.append(job)
        return True

    def handoff(self, worker: int) -> Job | None:
        """Called by the executor when ``worker`` is free: its next job, already marked running."""
        with self.lock:
            if not self.hand_out or not self.ready:
                return None
            job = self.ready.popleft()
            job.worker = worker
            self.running[worker] = job
            return job

    def _fill_free(self) -> None:
        while self.free:
            with self.lock:
                job = self.ready.popleft() if self.ready and not self.stopping else None
            job = job or self._ask_new()
            if job is None:
                return
            self._start(self.free.pop(0), job)

    def _start(self, worker: int, job: Job) -> None:
        job.worker = worker
        with self.lock:
            self.running[worker] = job
        self.ex.submit(job)

    # -- the loop ----------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop at its next safe point (a signal handler calls this)."""
        self.stop_reason = reason

    def check_stop(self) -> None:
        """Raise ``KeyboardInterrupt`` if a stop was requested: call it only between asks and tells."""
        if self.stop_reason is not None:
            raise KeyboardInterrupt(self.stop_reason)

    def prefill(self) -> None:
        """Ask the first trials (e.g. while the workers load their models)."""
        while self.ask_ahead():
            self.check_stop()

    def run(self) -> None:
        """Run to the budget, or to the timeout; ``interrupt_all`` after a KeyboardInterrupt."""
        self.ex.start(self.handoff)
        self.started = self.clock()
        while True:
            self.check_stop()
            late = self.timed_out()
            if late or self.stopping:
                self.hand_out = False
            if not late:
                self._fill_free()
            with self.lock:
                idle = not self.running
            if idle:
                break
            event = self.ex.next_event(0.0)
            if event is None:
                if self.ask_ahead():
                    continue
                event = self.ex.next_event(1.0)
                if event is None:
                    continue
            self.handle(event)
        with self.lock:
            left, self.ready = list(self.ready), collections.deque()
        for job in left:  # asked ahead but never run (timeout): run them on --resume
            self._interrupt(job)

    def handle(self, ev: Event) -> None:
        job = ev.job
        if ev.error is not None:
            self.log(f"worker {job.worker} died during trial {job.trial.number}: {ev.error}; "
                     "starting a replacement")
            self.ex.replace_worker(job.worker)
            if job.attempts >= MAX_ATTEMPTS:
                self._fail(job, f"worker died {job.attempts} times running it", None)
                return self._release(job, handed=False)
            job.attempts += 1
            job.stage = 1
            return self.ex.submit(job)
        r = ev.result
        job.materialize_s += r.materialize_seconds
        job.eval_s += r.eval_seconds
        if r.failed:
            self._fail(job, r.error, r.traceback)
        elif not r.finite(multi_objective=self.multi):
            self._fail(job, f"non-finite score {r.values(multi_objective=self.multi)}", None)
        elif not r.final:
            self.item_lists.check("stage1", r.item_ids, r.item_groups)
            decision = self.prune_decision(r, job.trial)
            if not decision.prune:  # the worker goes on at once; stage 1 is recorded meanwhile
                job.stage = 2
                self.ex.submit(job)
            self._stage1(job, r, decision)
            if not decision.prune:
                return
        else:
            self._complete(job, r)
        self._release(job, handed=ev.handed)

    def _release(self, job: Job, *, handed: bool) -> None:
        """The job is recorded: free its worker (unless already handed a job), settle duplicates."""
        with self.lock:
            if not handed and self.running.get(job.worker) is job:
                del self.running[job.worker]
                self.free.append(job.worker)
        self.live.pop(job.trial.number, None)
        self.n_done += 1
        self.on_done()
        dups = self.waiting.pop(job.digest, [])
        if dups and job.digest not in self.cache:  # the first one failed: the next copy runs for real
            with self.lock:
                self.ready.appendleft(dups[0])
            if dups[1:]:
                self.waiting[job.digest] = dups[1:]
            return
        for dup in dups:
            self.live.pop(dup.trial.number, None)
            self._tell_cached(dup.trial, self.cache[job.digest])

    # -- recording ---------------------------------------------------------------------------
    def _stage1(self, job: Job, r: T.StageResult, decision: pruning.PruneDecision) -> None:
        """Record stage 1 and its prune decision (after stage 2 was submitted, when not pruned);
        a pruned trial is told here."""
        trial = job.trial
        T.record_stage1(trial, score=r.score, items=r.items, decision=decision.to_attr())
        self.stage1_scores.append(float(r.score))
        if not decision.prune:
            self.stage1_bits[trial.number] = {d: list(v) for d, v in r.items.items()}
            return
        self._attrs(job, r)
        self.study.tell(trial, state=T.TrialState.PRUNED)
        self.cache[job.digest] = trial.number
        self.log(f"trial {trial.number} pruned at stage 1 (score {r.score:.4f}): {decision.reason}")

    def prune_decision(self, r: T.StageResult, trial: optuna.trial.Trial) -> pruning.PruneDecision:
        """Stop after stage 1? Against the stage-1 scores so far and the incumbent, both in memory;
        a seeded share of would-be prunes goes on to the full stage as the pruning audit."""
        number, _, bits = self.incumbent or (None, None, None)
        decision = pruning.decide(float(r.score), dict(r.items), earlier=self.stage1_scores,
                                  incumbent_correct=bits, incumbent=number, alpha=self.alpha,
                                  weights=self.weights, baseline=bool(T.baseline_name(trial)),
                                  clusters=dict(r.item_groups) or None)
        if decision.prune and pruning.audit_draw(trial.number, self.prune_audit, seed=self.audit_seed):
            return decision.audit()
        return decision

    def _new_incumbent(self, number: int, score: float, bits: dict[str, list[bool]] | None) -> None:
        """Keep the best trial by ``pruning.incumbent_key``, ties to the lower number."""
        best = self.incumbent
        if best is None or score > best[1] or (score == best[1] and number < best[0]):
            self.incumbent = (number, score, bits or None)

    def _complete(self, job: Job, r: T.StageResult) -> None:
        trial = job.trial
        self.item_lists.check("final", r.item_ids, r.item_groups)
        self._attrs(job, r)
        T.record_final(trial, score=r.score, items=r.items)
        values = r.values(multi_objective=self.multi)
        self.study.tell(trial, values if len(values) > 1 else values[0])
        self.cache[job.digest] = trial.number
        key = pruning.incumbent_key(r.items, mask=pruning.outside_mask(self.item_lists.stored()),
                                    weights=self.weights, baseline=T.baseline_name(trial))
        bits = self.stage1_bits.pop(trial.number, None)
        if key is not None:   # ranked on items outside stage 1: no winner's luck on the compared items
            self._new_incumbent(trial.number, key, bits)
        label = T.baseline_name(trial) or ""
        self.log(f"trial {trial.number} {label} score {r.score:.4f} "
                 + " ".join(f"{d}={v['acc']:.3f}" for d, v in r.domains.items()))

    def _attrs(self, job: Job, r: T.StageResult) -> None:
        T.record_run(job.trial, domains=r.domains, materialize_s=job.materialize_s, eval_s=job.eval_s,
                     worker=job.worker, attempts=job.attempts, started=job.started, threads=r.threads,
                     dtype=r.dtype)

    def _fail(self, job: Job, reason: str, tb: str | None) -> None:
        T.record_failure(job.trial, reason, traceback=tb, worker=job.worker, attempts=job.attempts)
        self.stage1_bits.pop(job.trial.number, None)
        self.study.tell(job.trial, state=T.TrialState.FAIL)
        self.log(f"trial {job.trial.number} FAILED: {reason}")

    def _tell_cached(self, trial: optuna.trial.Trial, number: int) -> None:
        src = self.study.get_trials(deepcopy=False)[number]
        T.record_cached(trial, src)
        if src.state == T.TrialState.COMPLETE:
            self.study.tell(trial, src.values if len(src.values) > 1 else src.values[0])
        else:
            if src.intermediate_values:
                trial.report(next(iter(src.intermediate_values.values())), 0)
            self.study.tell(trial, state=T.TrialState.PRUNED)
        self.n_done += 1
        self.on_done()
        self.log(f"trial {trial.number}: same recipe as trial {number}, not evaluated again")

    # -- stopping ----------------------------------------------------------------------------
    def _mark_interrupted(self, number: int) -> None:
        T.record_interrupted_number(self.storage, self.study, number)
        self.study.tell(number, state=T.TrialState.FAIL)

    def _interrupt(self, job: Job) -> None:
        T.record_interrupted(job.trial)
        self.study.tell(job.trial, state=T.TrialState.FAIL)
        T.enqueue_again(self.study, job.trial)
        self.live.pop(job.trial.number, None)

    def interrupt_all(self) -> None:
        """Stop: every trial asked but not recorded is failed as interrupted and queued for
        ``--resume``; a trial caught half-sampled is failed without a re-run."""
        self.stopping = True
        self.hand_out = False
        if self._asking is not None:
            T.record_interrupted(self._asking)
            self.study.tell(self._asking, state=T.TrialState.FAIL)
            self._asking = None
        with self.lock:
            self.ready.clear()
            self.running.clear()
        for job in list(self.live.values()):
            self._interrupt(job)
        self.waiting.clear()
