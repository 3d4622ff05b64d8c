"""The campaign driver: an Optuna study asked and told asynchronously, trials run by a
pool of Ray actors.

- Asynchronous: a new trial is asked as soon as any actor is free; no generation barrier.
- Staged: stage 1 scores a subset; the pruner stops clearly worse candidates there.
- Cached: a genome whose recipe was already scored is told the same values, not re-run.
- Faults: a dead actor is replaced and its trial re-run; NaN/inf weights or an evaluation
  error make a FAIL trial with its reason; the campaign goes on.
- Resume: completed trials live in the study storage; trials that were running when the
  driver died are marked interrupted (FAIL, not counted) and queued again.
"""

from __future__ import annotations

import collections
import json
import math
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from search.campaign import Campaign
from search.genome import GenomeSpace
from search.samplers import make_sampler

# Trial user attributes (the study is the campaign's record; reports read these names).
A_RECIPE = "recipe"               # the mergekit-compatible recipe YAML
A_DIGEST = "recipe_digest"
A_BASELINE = "baseline"           # "uniform" or "model:<ref>" for the seeded baselines
A_DOMAINS = "domains"             # {domain: {acc, gold_prob, n}} of the final stage
A_SCORE = "score"                 # weighted fitness of the final stage
A_STAGE1 = "stage1_score"
A_MATERIALIZE = "materialize_seconds"
A_EVAL = "eval_seconds"
A_WORKER = "worker"
A_ERROR = "error"
A_INTERRUPTED = "interrupted"
A_CACHED = "cached_from"
A_START = "started_at"
A_END = "finished_at"
A_ATTEMPTS = "attempts"

MAX_ATTEMPTS = 3          # a trial whose worker dies this many times becomes a FAIL trial
PRUNE_PERCENTILE = 25.0   # stage-1 scores in the bottom quarter stop there
LOOKAHEAD_PER_WORKER = 1  # trials asked ahead per worker, so a finishing worker never waits for ask/tell


class DriverError(ValueError):
    pass


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count toward the budget: done, and not interrupted."""
    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False)
            if t.state in done and not t.user_attrs.get(A_INTERRUPTED)]


@dataclass
class _Job:
    trial: optuna.trial.Trial
    digest: str
    recipe_yaml: str
    stage: int
    worker: int
    attempts: int = 1
    started: float = field(default_factory=time.time)
    materialize_s: float = 0.0
    eval_s: float = 0.0
    stage1: float | None = None


Item = tuple[optuna.trial.Trial, str, str]   # a trial asked and ready to run: (trial, digest, recipe YAML)


class _Dispatcher(threading.Thread):
    """Watches the running trials; hands a worker that finishes the next trial asked ahead.

    Shared with the driver's thread, under ``lock``: ``actors``, ``in_flight`` (object ref ->
    job), ``spare`` (trials asked ahead) and ``collecting`` (results taken from Ray and not
    yet queued). Results go to ``results`` as (job, result, error, handed) in the order they
    arrive; ``handed`` says the worker already got its next trial. The Optuna study is
    touched by the driver's thread only.
    """

    def __init__(self, actors: list[Any]):
        super().__init__(name="brmerge-dispatch", daemon=True)
        self.lock = threading.Lock()
        self.actors = actors
        self.in_flight: dict[Any, _Job] = {}
        self.spare: collections.deque[Item] = collections.deque()
        self.collecting = 0
        self.results: queue.Queue[tuple[_Job, dict[str, Any] | None, BaseException | None, bool]] = queue.Queue()
        self.hand_out = True          # False once the campaign times out or is stopping
        self._closed = threading.Event()

    def submit(self, worker: int, item: Item) -> None:
        """Start ``item`` on ``worker`` (hold the lock)."""
        self.submit_job(_Job(item[0], item[1], item[2], 1, worker))

    def submit_job(self, job: _Job) -> None:
        """Start (or restart) ``job`` at its stage on its worker (hold the lock)."""
        self.in_flight[self.actors[job.worker].run.remote(job.recipe_yaml, stage=job.stage)] = job

    def close(self) -> None:
        self._closed.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()

    def run(self) -> None:
        import ray

        while not self._closed.is_set():
            with self.lock:
                refs = list(self.in_flight)
            if not refs:
                self._closed.wait(0.005)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.05)   # releases the GIL while it waits
            for ref in ready:
                with self.lock:
                    job = self.in_flight.pop(ref, None)
                    if job is None:
                        continue
                    self.collecting += 1
                result: dict[str, Any] | None = None
                error: BaseException | None = None
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                    error = exc
                handed = False
                with self.lock:
                    if (result is not None and ("error" in result or result.get("final"))
                            and self.hand_out and self.spare):
                        self.submit(job.worker, self.spare.popleft())  # its next trial first
                        handed = True
                self.results.put((job, result, error, handed))
                with self.lock:
                    self.collecting -= 1


def study_directions(campaign: Campaign) -> list[str]:
    return ["maximize"] * (len(campaign.objectives) if campaign.multi_objective else 1)


def open_study(campaign: Campaign, directory: Path, *, resume: bool,
               sampler: optuna.samplers.BaseSampler | None = None,
               pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    url = campaign.storage_url(directory)
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}
                                         if url.startswith("sqlite") else {})
    if url.startswith("sqlite"):
        _sqlite_wal(storage)
    existing = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if campaign.name in existing and not resume:
        raise DriverError(f"campaign {campaign.name!r} already has a study in {url}: pass --resume to "
                          "continue it, or use another --dir / name")
    if campaign.name not in existing and resume:
        raise DriverError(f"nothing to resume: no study {campaign.name!r} in {url}; run without --resume")
    return optuna.create_study(study_name=campaign.name, storage=storage, sampler=sampler, pruner=pruner,
                               directions=study_directions(campaign), load_if_exists=True)


def _sqlite_wal(storage: optuna.storages.RDBStorage) -> None:
    """WAL journal, fsync at checkpoints only: a commit costs ~0.05 ms instead of an fsync
    (~15 ms here). Committed trials still survive the driver being killed (kill -9); only an
    OS crash or power loss can drop the last commits."""
    import sqlalchemy

    def pragmas(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    sqlalchemy.event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened by RDBStorage's own set-up get them too


class Driver:
    def __init__(self, campaign: Campaign, directory: Path, *, resume: bool = False,
                 worker_factory: Callable[..., Any] | None = None, n_workers: int | None = None,
                 progress: bool = True, log: Callable[[str], None] | None = None):
        self.campaign = campaign
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.resume = resume
        self.worker_factory = worker_factory
        self.n_workers_override = n_workers
        self.progress = progress
        self._log_file = open(self.directory / "campaign.log", "a", encoding="utf-8")
        self._echo = log
        self.stopping = False
        self.loop_started: float | None = None  # when every worker was ready (the loop's start)
        self.loop_ended: float | None = None    # when the trial loop returned (before the clean-up)

    # -- logging -----------------------------------------------------------------------------
    def log(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        self._log_file.write(line + "\n")
        self._log_file.flush()
        if self._echo:
            self._echo(message)

    # -- set-up ------------------------------------------------------------------------------
    def _num_layers(self) -> int:
        from merge_core.plan import num_layers
        from merge_core.sources import resolve_model

        src = resolve_model(self.campaign.base_model)
        return num_layers(src.config, list(src.tensor_files()))

    def _prepare_study(self) -> tuple[optuna.Study, GenomeSpace]:
        c = self.campaign
        space = GenomeSpace(c, self._num_layers())
        baselines = space.baselines()
        multi = c.multi_objective
        pruner = (optuna.pruners.PercentilePruner(PRUNE_PERCENTILE, n_startup_trials=len(baselines) + 2,
                                                  n_warmup_steps=0)
                  if c.stage1 and not multi else optuna.pruners.NopPruner())
        sampler = make_sampler(c.sampler, seed=c.seed, x0=baselines[0][1], n_baselines=len(baselines))
        study = open_study(c, self.directory, resume=self.resume, sampler=sampler, pruner=pruner)
        if not self.resume:
            study.set_user_attr("campaign", json.loads(json.dumps(c.raw, default=str)))
            study.set_user_attr("num_layers", space.num_layers)
            study.set_user_attr("objective_names", list(c.objectives) if multi else ["score"])
            for name, params in baselines:
                study.enqueue_trial(params, user_attrs={A_BASELINE: name})
            self.log(f"new study with {len(space.param_names())} parameters; queued baselines: "
                     + ", ".join(n for n, _ in baselines))
        else:
            self._requeue_interrupted(study, space)
        return study, space

    def _requeue_interrupted(self, study: optuna.Study, space: GenomeSpace) -> None:
        genome = set(space.param_names())
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            # A trial killed while being asked has no complete genome: nothing to re-run
            # (its slot in the budget goes to a freshly sampled trial).
            complete = set(t.params) == genome
            self._interrupt(study, t.number, t._trial_id, t.params, t.user_attrs, requeue=complete)
            self.log(f"trial {t.number} was running when the driver stopped: "
                     + ("queued again" if complete else "it was still being sampled; not re-run"))

    def _interrupt(self, study: optuna.Study, number: int, trial_id: int, params: dict[str, Any],
                   attrs: dict[str, Any], *, requeue: bool = True) -> None:
        optuna.trial.Trial(study, trial_id).set_user_attr(A_INTERRUPTED, True)
        study.tell(number, state=optuna.trial.TrialState.FAIL)
        if requeue:
            keep = {k: v for k, v in attrs.items() if k == A_BASELINE}
            study.enqueue_trial(params, user_attrs=keep)

    # -- workers -----------------------------------------------------------------------------
    def _start_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        addr = self.campaign.ray_address
        if addr:
            ray.init(address=addr, log_to_driver=False)
        else:
            # a private local cluster on loopback, without the Ray dashboard server
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False)

    def _worker_plan(self) -> tuple[int, dict[str, float], int | None]:
        """(count, actor resources, torch threads) from the cluster and the campaign."""
        import ray

        res = ray.cluster_resources()
        gpus = int(res.get("GPU", 0))
        cpus = int(res.get("CPU", 1))
        c = self.campaign
        use_gpu = gpus > 0 and c.gpus_per_worker > 0
        if self.n_workers_override:
            count = self.n_workers_override
        elif c.workers == "auto":
            count = max(1, int(gpus / c.gpus_per_worker)) if use_gpu else max(1, cpus // 2)
        else:
            count = int(c.workers)
        if use_gpu:
            return count, {"num_gpus": c.gpus_per_worker, "num_cpus": 1}, None
        per = max(1, cpus // count)
        # OpenMP threads of torch and numba spin after each parallel region and take the
        # cores from each other (and from other workers); passive waiting must be set
        # before the OpenMP runtime loads, so it goes into the worker's environment.
        return count, {"num_cpus": min(per, cpus) if count <= cpus else cpus / count,
                       "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}, per

    def _make_actor(self, index: int):
        import ray

        count, resources, threads = self._plan
        factory = self.worker_factory
        if factory is None:
            from search.worker import TrialWorker

            factory = TrialWorker
        cls = ray.remote(max_restarts=0, max_concurrency=1, **resources)(factory)
        return cls.remote(self.campaign, index, threads=threads)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> optuna.Study:
        """Run the campaign to its budget (or timeout, or Ctrl-C); returns the study.

        Two threads share the work. A dispatcher thread (``_Dispatcher``) only watches the
        workers: when one finishes a trial it hands that worker the next trial asked ahead,
        at once, and passes the result on. This thread does everything Optuna: it records
        results, asks new trials (ahead, one per worker) and fills free workers. Asking and
        recording then never keep a worker idle unless the driver falls behind overall.
        """
        import ray

        study, space = self._prepare_study()
        self.study, self.space = study, space
        self._start_ray()
        self._plan = self._worker_plan()
        n_workers = self._plan[0]
        self.log(f"starting {n_workers} worker(s) with {self._plan[1]}")
        disp = _Dispatcher([self._make_actor(i) for i in range(n_workers)])
        info_refs = [a.info.remote() for a in disp.actors]
        free = list(range(n_workers))
        waiting_dupes: dict[str, list[optuna.trial.Trial]] = {}
        cache = self._cache_from(study)
        budget = self.campaign.trials
        n_done = len(finished_trials(study))  # counted here from now on: a full read per loop is O(trials)
        bar = _bar(budget, n_done, self.progress)
        lookahead = LOOKAHEAD_PER_WORKER * n_workers
        started = time.time()

        def finish() -> None:
            nonlocal n_done
            n_done += 1
            bar.update(1)

        def asked_or_done() -> int:
            with disp.lock:
                outstanding = len(disp.in_flight) + disp.collecting + len(disp.spare)
            return n_done + outstanding + disp.results.qsize() + sum(len(v) for v in waiting_dupes.values())

        def timed_out() -> bool:
            return self.campaign.timeout is not None and time.time() - started > self.campaign.timeout

        def ask_new() -> Item | None:
            """Ask the sampler for a trial to run (cached and duplicate genomes are dealt with
            here), or None when the budget is asked for."""
            while not self.stopping and asked_or_done() < budget:
                trial = study.ask(space.distributions())
                recipe = space.to_recipe(trial.params)
                digest, recipe_yaml = recipe.digest(), recipe.to_yaml()
                trial.set_user_attr(A_DIGEST, digest)
                trial.set_user_attr(A_RECIPE, recipe_yaml)
                if digest in cache:
                    self._tell_cached(study, trial, cache[digest])
                    finish()
                    continue
                with disp.lock:
                    running = any(j.digest == digest for j in disp.in_flight.values()) \
                        or any(d == digest for _, d, _ in disp.spare)
                if running:
                    waiting_dupes.setdefault(digest, []).append(trial)
                    continue
                return trial, digest, recipe_yaml
            return None

        def next_trial() -> Item | None:
            """The next trial to run: one asked ahead if any, else a new one (or None)."""
            with disp.lock:
                if disp.spare and not self.stopping:
                    return disp.spare.popleft()
            return ask_new()

        def ask_ahead() -> bool:
            """Ask one more trial ahead if there is room; whether one was asked."""
            with disp.lock:
                room = len(disp.spare) < lookahead
            if not room or self.stopping or timed_out():
                return False
            item = ask_new()
            if item is None:
                return False
            with disp.lock:
                disp.spare.append(item)
            return True

        def resubmit(job: _Job) -> None:
            with disp.lock:
                disp.submit_job(job)

        def interrupt_all() -> None:
            """Every trial asked but not recorded: failed as interrupted, queued for --resume."""
            pending = [job.trial for job in disp.in_flight.values()] + [t for t, _, _ in disp.spare]
            while not disp.results.empty():
                pending.append(disp.results.get_nowait()[0].trial)
            pending += [t for dupes in waiting_dupes.values() for t in dupes]
            for t in pending:
                self._interrupt(study, t.number, t._trial_id, t.params, t.user_attrs)
            disp.in_flight.clear()
            disp.spare.clear()
            waiting_dupes.clear()

        old_handler = signal.getsignal(signal.SIGINT)
        try:
            # the first trials are asked while the workers load their models
            while ask_ahead():
                pass
            infos = ray.get(info_refs)
            for info in infos:
                self.log(f"worker {info['worker']} ready on {info['device']} ({info['load_seconds']:.1f} s)")
            started = self.loop_started = time.time()
            disp.start()
            while True:
                late = timed_out()
                if late or self.stopping:
                    disp.hand_out = False
                while free and not late:
                    item = next_trial()
                    if item is None:
                        break
                    with disp.lock:
                        disp.submit(free.pop(0), item)
                with disp.lock:
                    idle = not disp.in_flight and not disp.collecting
                if idle and disp.results.empty():
                    break
                try:
                    job, result, error, handed = disp.results.get_nowait()
                except queue.Empty:
                    if ask_ahead():
                        continue
                    try:
                        job, result, error, handed = disp.results.get(timeout=1.0)
                    except queue.Empty:
                        continue
                if error is not None:
                    self.log(f"worker {job.worker} died during trial {job.trial.number}: "
                             f"{type(error).__name__}; starting a replacement")
                    replacement = self._make_actor(job.worker)
                    with disp.lock:
                        disp.actors[job.worker] = replacement
                    if job.attempts >= MAX_ATTEMPTS:
                        self._tell_fail(study, job, f"worker died {job.attempts} times running it")
                        free.append(job.worker)
                        finish()
                        continue
                    job.attempts += 1
                    job.stage = 1
                    resubmit(job)
                    continue
                done = self._handle(study, job, result, resubmit, cache)
                if done:
                    if not handed:
                        free.append(job.worker)
                    finish()
                    for dup in waiting_dupes.pop(job.digest, []):
                        entry = cache.get(job.digest)
                        if entry is None:  # the first one failed: run the duplicate for real
                            with disp.lock:
                                if free:
                                    disp.submit(free.pop(0), (dup, job.digest, job.recipe_yaml))
                                else:  # next in line for a worker (it was stranded here before)
                                    disp.spare.appendleft((dup, job.digest, job.recipe_yaml))
                        else:
                            self._tell_cached(study, dup, entry)
                            finish()
            self.loop_ended = time.time()
            disp.close()
            for t, _, _ in disp.spare:  # asked ahead but never run (timeout): run them on --resume
                self._interrupt(study, t.number, t._trial_id, t.params, t.user_attrs)
        except KeyboardInterrupt:
            self.stopping = True
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up
            disp.close()
            self.log("interrupted: in-flight trials are queued again for --resume")
            interrupt_all()
            raise
        finally:
            disp.close()
            bar.close()
            signal.signal(signal.SIGINT, old_handler)
            for a in disp.actors:
                try:
                    ray.kill(a)
                except Exception:  # already dead
                    pass
        n = len(finished_trials(study))
        self.log(f"finished: {n} of {budget} trials")
        return study

    def _cache_from(self, study: optuna.Study) -> dict[str, tuple[str, Any, int]]:
        cache: dict[str, tuple[str, Any, int]] = {}
        for t in study.get_trials(deepcopy=False):
            digest = t.user_attrs.get(A_DIGEST)
            if not digest or t.user_attrs.get(A_CACHED) is not None:
                continue
            if t.state == optuna.trial.TrialState.COMPLETE:
                cache[digest] = ("complete", t.values, t.number)
            elif t.state == optuna.trial.TrialState.PRUNED:
                cache[digest] = ("pruned", None, t.number)
        return cache

    def _tell_cached(self, study: optuna.Study, trial: optuna.trial.Trial, entry: tuple[str, Any, int]) -> None:
        kind, values, number = entry
        trial.set_user_attr(A_CACHED, number)
        src = study.get_trials(deepcopy=False)[number]
        if src is not None:
            for key in (A_DOMAINS, A_SCORE, A_STAGE1):
                if key in src.user_attrs:
                    trial.set_user_attr(key, src.user_attrs[key])
        if kind == "complete":
            study.tell(trial, values if len(values) > 1 else values[0])
        else:
            if src is not None and src.intermediate_values:
                trial.report(next(iter(src.intermediate_values.values())), 0)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        self.log(f"trial {trial.number}: same recipe as trial {number}, not evaluated again")

    def _tell_fail(self, study: optuna.Study, job: _Job, reason: str) -> None:
        job.trial.set_user_attr(A_ERROR, reason)
        job.trial.set_user_attr(A_ATTEMPTS, job.attempts)
        job.trial.set_user_attr(A_WORKER, job.worker)
        study.tell(job.trial, state=optuna.trial.TrialState.FAIL)
        self.log(f"trial {job.trial.number} FAILED: {reason}")

    def _handle(self, study: optuna.Study, job: _Job, result: dict[str, Any], resubmit: Callable[[_Job], None],
                cache: dict) -> bool:
        """Record one stage's result; True when the trial is finished (its worker is free).
        A trial that goes on to stage 2 is handed back to its worker through ``resubmit``."""
        job.materialize_s += float(result.get("materialize_seconds", 0.0))
        job.eval_s += float(result.get("eval_seconds", 0.0))
        trial = job.trial
        if "error" in result:
            self._tell_fail(study, job, result["error"])
            return True
        score = float(result["score"])
        values = result["objectives"] if self.campaign.multi_objective else [score]
        if any(not math.isfinite(v) for v in values):
            self._tell_fail(study, job, f"non-finite score {values}")
            return True
        if not result.get("final"):
            job.stage1 = score
            trial.set_user_attr(A_STAGE1, score)
            trial.report(score, 0)
            if trial.should_prune():
                self._attrs(job, result)
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                cache[job.digest] = ("pruned", None, trial.number)
                self.log(f"trial {trial.number} pruned at stage 1 (score {score:.4f})")
                return True
            job.stage = 2
            resubmit(job)
            return False
        self._attrs(job, result)
        trial.set_user_attr(A_SCORE, score)
        study.tell(trial, values if len(values) > 1 else values[0])
        cache[job.digest] = ("complete", values, trial.number)
        label = trial.user_attrs.get(A_BASELINE, "")
        self.log(f"trial {trial.number} {label} score {score:.4f} "
                 + " ".join(f"{d}={v['acc']:.3f}" for d, v in result["domains"].items()))
        return True

    def _attrs(self, job: _Job, result: dict[str, Any]) -> None:
        t = job.trial
        t.set_user_attr(A_DOMAINS, result.get("domains", {}))
        t.set_user_attr(A_MATERIALIZE, round(job.materialize_s, 4))
        t.set_user_attr(A_EVAL, round(job.eval_s, 4))
        t.set_user_attr(A_WORKER, job.worker)
        t.set_user_attr(A_ATTEMPTS, job.attempts)
        t.set_user_attr(A_START, job.started)
        t.set_user_attr(A_END, time.time())


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="trials", unit="trial", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def run_campaign(campaign: Campaign, directory: Path, *, resume: bool = False, **options: Any) -> optuna.Study:
    return Driver(campaign, directory, resume=resume, **options).run()
