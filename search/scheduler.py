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
                 alpha: float = pruning.DEFAULT_ALPHA, timeout: float | None = None,
                 log: Callable[[str], None] = lambda m: None, on_done: Callable[[], None] = lambda: None,
                 clock: Callable[[], float] = time.time):
        self.study, self.storage, self.space = study, storage, space
        self.budget, self.multi, self.alpha = budget, multi_objective, alpha
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
        trials = study.get_trials(deepcopy=False)
        self.n_done = sum(T.counts_toward_budget(t) for t in trials)
        self.cache = {t.user_attrs[T.A_DIGEST]: t.number for t in trials if t.user_attrs.get(T.A_DIGEST)
                      and t.user_attrs.get(T.A_CACHED) is None and t.state in (T.TrialState.COMPLETE,
                                                                               T.TrialState.PRUNED)}
        self.stage1_scores = [float(t.user_attrs[T.A_STAGE1]) for t in trials
                              if T.A_STAGE1 in t.user_attrs and t.user_attrs.get(T.A_CACHED) is None]
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
            self.study.enqueue_trial(params, user_attrs={T.A_BASELINE: name})

    def requeue_interrupted(self) -> None:
        """Trials a dead driver left RUNNING: interrupted (not counted), queued again."""
        genome = set(self.space.param_names())
        for t in self.study.get_trials(deepcopy=False, states=(T.TrialState.RUNNING,)):
            complete = set(t.params) == genome  # killed while being asked: nothing to re-run
            self._mark_interrupted(t.number)
            if complete:
                self._enqueue_again(t.params, t.user_attrs)
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
            trial.set_user_attr(T.A_DIGEST, job.digest)
            trial.set_user_attr(T.A_RECIPE, job.recipe_yaml)
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
            if self._stage1(job, r):
                job.stage = 2
                return self.ex.submit(job)
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
    def _stage1(self, job: Job, r: T.StageResult) -> bool:
        """Record stage 1; True when the trial goes on to the full stage."""
        trial = job.trial
        T.check_item_lists(self.study, "stage1", r.item_ids)
        trial.set_user_attr(T.A_STAGE1, r.score)
        trial.set_user_attr(T.A_STAGE1_ITEMS, T.encode_items(r.items))
        trial.report(r.score, 0)
        decision = self.prune_decision(r)
        self.stage1_scores.append(float(r.score))
        trial.set_user_attr(T.A_PRUNE, decision.to_attr())
        if not decision.prune:
            return True
        self._attrs(job, r)
        self.study.tell(trial, state=T.TrialState.PRUNED)
        self.cache[job.digest] = trial.number
        self.log(f"trial {trial.number} pruned at stage 1 (score {r.score:.4f}): {decision.reason}")
        return False

    def prune_decision(self, r: T.StageResult) -> pruning.PruneDecision:
        number, bits = pruning.incumbent(self.study)
        return pruning.decide(float(r.score), r.correct(), earlier=self.stage1_scores,
                              incumbent_correct=bits, incumbent=number, alpha=self.alpha)

    def _complete(self, job: Job, r: T.StageResult) -> None:
        trial = job.trial
        T.check_item_lists(self.study, "final", r.item_ids)
        self._attrs(job, r)
        trial.set_user_attr(T.A_SCORE, r.score)
        trial.set_user_attr(T.A_ITEMS, T.encode_items(r.items))
        values = r.values(multi_objective=self.multi)
        self.study.tell(trial, values if len(values) > 1 else values[0])
        self.cache[job.digest] = trial.number
        label = trial.user_attrs.get(T.A_BASELINE, "")
        self.log(f"trial {trial.number} {label} score {r.score:.4f} "
                 + " ".join(f"{d}={v['acc']:.3f}" for d, v in r.domains.items()))

    def _attrs(self, job: Job, r: T.StageResult) -> None:
        T.record_run(job.trial, domains=r.domains, materialize_s=job.materialize_s, eval_s=job.eval_s,
                     worker=job.worker, attempts=job.attempts, started=job.started, threads=r.threads)

    def _fail(self, job: Job, reason: str, tb: str | None) -> None:
        T.record_failure(job.trial, reason, traceback=tb, worker=job.worker, attempts=job.attempts)
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
        study_id = self.storage.get_study_id_from_name(self.study.study_name)
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(study_id, number)
        self.storage.set_trial_user_attr(trial_id, T.A_INTERRUPTED, True)
        self.study.tell(number, state=T.TrialState.FAIL)

    def _enqueue_again(self, params: dict[str, Any], attrs: dict[str, Any]) -> None:
        keep = {k: v for k, v in attrs.items() if k == T.A_BASELINE}
        self.study.enqueue_trial(params, user_attrs=keep)

    def _interrupt(self, job: Job) -> None:
        job.trial.set_user_attr(T.A_INTERRUPTED, True)
        self.study.tell(job.trial, state=T.TrialState.FAIL)
        self._enqueue_again(job.trial.params, job.trial.user_attrs)
        self.live.pop(job.trial.number, None)

    def interrupt_all(self) -> None:
        """Stop: every trial asked but not recorded is failed as interrupted and queued for
        ``--resume``; a trial caught half-sampled is failed without a re-run."""
        self.stopping = True
        self.hand_out = False
        if self._asking is not None:
            self._asking.set_user_attr(T.A_INTERRUPTED, True)
            self.study.tell(self._asking, state=T.TrialState.FAIL)
            self._asking = None
        with self.lock:
            self.ready.clear()
            self.running.clear()
        for job in list(self.live.values()):
            self._interrupt(job)
        self.waiting.clear()
