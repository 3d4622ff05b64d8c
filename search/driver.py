"""The campaign driver: wires the study (``storage``), the policies (``scheduler``) and the
workers (``executor``), and handles signals.

- SIGINT, SIGTERM and SIGHUP stop a campaign the same way: trials asked or running are
  marked interrupted (not counted) and queued again for ``--resume``.
- A dead cluster (the raylet or the GCS killed) stops it the same way, with one line, within a
  bounded time (``search.executor``: the cluster watch).
- A storage failure (database gone, disk full) stops it with one line naming the storage
  (masked); the trials it was running stay RUNNING in the study and ``--resume`` re-runs them.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import yaml

from merge_core.errors import BrmergeError
from search import locks
from search import model_identity
from search import storage as S
from search import trials as T
from search.campaign import Campaign, parse_campaign
from search.campaign_files import append_text, replace_text
from search.errors import DriverError
from search.genome import GenomeSpace
from search.protocol import ClusterLost, make_executor
from search.samplers import make_sampler
from search.scheduler import Scheduler

# What a resume must keep: every field that changes which candidates exist or how they score.
SEARCH_FIELDS = ("base_model", "models", "method", "granularity", "params", "split_attn_mlp", "sampler",
                 "objectives", "suite", "limit", "stage1", "prune_alpha", "data_dir", "allow_test",
                 "num_fewshot", "chat_template", "seed")
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def stop_on_signals(request_stop: Callable[[str], None]) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP (Ctrl-C; what Slurm, Kubernetes and a closed terminal send)
    ask the scheduler to stop. It stops at its next safe point (never halfway through an ask
    or a tell), within about a second, and raises ``KeyboardInterrupt`` there."""
    def stop(signum: int, _frame: Any) -> None:
        for s in STOP_SIGNALS:   # a second signal must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        request_stop(signal.Signals(signum).name)

    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class Driver:
    def __init__(self, campaign: Campaign, directory: Path, *, resume: bool = False,
                 worker_factory: Callable[..., Any] | None = None, n_workers: int | None = None,
                 progress: bool = True, log: Callable[[str], None] | None = None,
                 accept_changed_models: bool = False):
        self.campaign = campaign
        self.accept_changed_models = accept_changed_models
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.resume = resume
        self.worker_factory = worker_factory
        self.n_workers = n_workers
        self.progress = progress
        self._echo = log
        self.loop_started: float | None = None  # when every worker was ready (the loop's start)
        self.loop_ended: float | None = None    # when the trial loop returned (before the clean-up)

    def log(self, message: str) -> None:
        append_text(self.directory / "campaign.log", f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n",
                    root=self.directory)
        if self._echo:
            self._echo(message)

    def _on_done(self, bar) -> Callable[[], None]:
        def done() -> None:
            bar.update(1)
            self.lock.check()   # the lease was taken over (this driver was presumed dead): stop
        return done

    def _preflight(self) -> int:
        """Every model resolved and checked (exists, safetensors, no remote code, compatible)
        here, before a study exists and before Ray starts: a problem is one line now, not an
        actor's traceback and a study left with a RUNNING trial. Returns the base's layer count."""
        from merge_core.checks import check_compatible
        from merge_core.io import read_header
        from merge_core.plan import num_layers
        from merge_core.sources import resolve_model
        from search.sizing_report import preflight

        # configs only, no weights: a worker that cannot fit is refused first, with the fix
        self.plan_line = preflight(self.campaign)
        refs = [self.campaign.base_model, *self.campaign.models]
        sources = [resolve_model(r) for r in refs]
        for s in sources:   # every header checked against its file: a truncated fine-tune is one line now
            for f in (s.weight_files if s.format == "safetensors" else ()):
                read_header(f)
        check_compatible(sources)
        self.sources = sources
        base = sources[0]
        if self.campaign.chat_template:
            check_chat_template(base.path, ref=self.campaign.base_model)
        return num_layers(base.config, list(base.tensor_files()))

    def _open(self, location: S.StorageLocation, num_layers: int
              ) -> tuple[optuna.Study, optuna.storages.BaseStorage, GenomeSpace, list]:
        c = self.campaign
        space = GenomeSpace(c, num_layers)
        baselines = space.baselines()
        sampler = make_sampler(c.sampler, seed=c.seed, x0=baselines[0][1], n_baselines=len(baselines))
        rdb = S.open_rdb(location, wal=True)
        study = S.open_study(c, self.directory, resume=self.resume, sampler=sampler,
                             pruner=optuna.pruners.NopPruner(), location=location, rdb=rdb)
        return study, rdb, space, baselines

    def _record_campaign(self, study: optuna.Study | None) -> None:
        """A new study: ``DIR/campaign.yaml`` is written now, once the study exists (a refused
        search leaves the directory as it was). A resume: refuse a campaign whose search changed,
        else update the copy. The copy never holds a password."""
        c = self.campaign
        if self.resume:
            self._check_resume(study)
        copy = self.directory / "campaign.yaml"
        source = Path(c.source_file) if c.source_file and Path(c.source_file).is_file() else None
        if source is not None and source.resolve() != copy.resolve():
            replace_text(copy, S.mask_text(source.read_text(encoding="utf-8")), root=self.directory)
        elif source is None and not self.resume:
            replace_text(copy, S.mask_text(yaml.safe_dump(dict(c.raw), sort_keys=False)), root=self.directory)

    def _check_resume(self, study: optuna.Study) -> None:
        c = self.campaign
        stored = T.campaign_attr(study)
        if not stored:
            return
        try:
            before = parse_campaign(stored, source="the study's campaign")
        except BrmergeError:
            return   # written by an older brmerge: nothing reliable to compare with
        changed = [f"{k}: {getattr(before, k)!r} -> {getattr(c, k)!r}" for k in SEARCH_FIELDS
                   if getattr(before, k) != getattr(c, k)]
        if changed:
            raise DriverError("--resume with a campaign whose search changed (" + "; ".join(changed)
                              + "): only budget, workers, ray and storage may change on a resume; "
                              "restore those keys, or start a new campaign with another name or --dir")

    def _record_sources(self, study: optuna.Study) -> None:
        """Record the models' identities; on a resume, refuse models that changed since (unless
        ``accept_changed_models``, which restarts the genome cache at the next trial)."""
        now = model_identity.identities(self.sources, self.directory)
        before = T.recorded_sources(study) if self.resume else []
        changed = model_identity.changes(before, now) if before else []
        if changed and not self.accept_changed_models:
            raise DriverError("--resume with models that are not the ones this campaign scored: "
                              + "; ".join(changed) + ". Restore them (or resume from the directory the "
                              "campaign began in), or pass --accept-changed-models to go on with these "
                              "models (earlier scores are then never reused for a recipe asked again)")
        if changed:
            start = len(study.get_trials(deepcopy=False))
            T.record_cache_start(study, start)
            self.log("models changed since the campaign began (" + "; ".join(changed) + "); accepted "
                     f"(--accept-changed-models): the genome cache starts again at trial {start}")
        T.record_sources(study, now)

    def run(self) -> optuna.Study:
        """Run the campaign to its budget (or timeout, or a stop signal); returns the study.

        The campaign lock is taken first: a second driver, or ``--resume`` while one is alive,
        is refused before it touches the study (a resume would mark the live trials interrupted).
        """
        location = S.resolve(self.campaign, self.directory)
        if self.resume:   # before anything writes: the lock's lease would create the study file
            S.require_study_file(location)
        num_layers = self._preflight()   # before the lock, which writes to the storage
        with locks.acquire(self.directory, location=location, study_name=self.campaign.name) as lock:
            self.lock = lock
            self.log(f"storage {location} ({location.source})")
            return self._run(location, num_layers)

    def _run(self, location: S.StorageLocation, num_layers: int) -> optuna.Study:
        c = self.campaign
        study, rdb, space, baselines = self._open(location, num_layers)
        self.study, self.space = study, space
        self._record_campaign(study)
        self._record_sources(study)   # before the scheduler reads the genome cache
        bar = _bar(c.trials, len(T.finished_trials(study)), self.progress)
        sched = Scheduler(study=study, storage=rdb, space=space, budget=c.trials,
                          multi_objective=c.multi_objective, alpha=c.prune_alpha,
                          prune_audit=c.prune_audit, timeout=c.timeout,
                          log=self.log, on_done=self._on_done(bar))
        # on a resume too: the record shows the campaign as it runs now (its budget may have grown)
        T.record_study(study, campaign=S.public_campaign(c.raw), num_layers=space.num_layers,
                       objectives=list(c.objectives) if c.multi_objective else ["score"])
        if self.resume:
            sched.requeue_interrupted()
        else:
            sched.seed_baselines(baselines)
            self.log(f"new study with {len(space.param_names())} parameters; queued baselines: "
                     + ", ".join(n for n, _ in baselines))
        executor = make_executor(c, n_workers=self.n_workers, worker_factory=self.worker_factory)
        sched.attach(executor)
        self.log(f"starting {executor.n_workers} worker(s) with {executor.resources}")
        try:
            with stop_on_signals(sched.request_stop), S.guard(location, doing="write to"):
                try:
                    sched.prefill()   # the first trials are asked while the workers load their models
                    for info in executor.wait_ready(sched.check_stop):
                        self.log(f"worker {info['worker']} ready on {info['device']} "
                                 f"({info['load_seconds']:.1f} s)")
                    self.loop_started = time.time()
                    sched.run()
                    self.loop_ended = time.time()
                except locks.LockError:
                    executor.close()   # another driver owns the study now: leave its trials alone
                    raise
                except KeyboardInterrupt as stop:
                    executor.close()
                    self.log(f"stopped ({stop or 'SIGINT'}): in-flight trials are queued again for --resume")
                    sched.interrupt_all()
                    raise
                except ClusterLost as lost:   # as a Ctrl-C: what ran is queued again; then one line
                    executor.close()
                    self.log(f"stopped: {lost}")
                    sched.interrupt_all()
                    raise
        finally:
            executor.close()
            bar.close()
        self.log(f"finished: {len(T.finished_trials(study))} of {c.trials} trials")
        return study


def check_chat_template(path: Path, *, ref: str) -> None:
    """The base's chat template renders one prompt (in the limited sandbox the evaluator uses):
    a missing or failing template is one line before any study exists, not a worker's crash."""
    import jinja2
    from transformers import AutoTokenizer

    from evals.chat import ChatTemplateError, render, require_chat_template

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    require_chat_template(tokenizer, model=f"base model '{ref}'")
    # the turns a few-shot prompt has (``--fewshot_as_multiturn``): system, user, assistant, user
    messages = [{"role": "system", "content": "Responda."}, {"role": "user", "content": "1 + 1?"},
                {"role": "assistant", "content": "2"}, {"role": "user", "content": "2 + 2?"}]
    try:
        render(tokenizer, messages)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the chat template of base model '{ref}' fails to render a prompt ("
                                + " ".join(str(exc).split())[:200] + "): fix its tokenizer_config.json, or set "
                                "eval.chat_template: false") from None


def _bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="trials", unit="trial", disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def run_campaign(campaign: Campaign, directory: Path, *, resume: bool = False, **options: Any) -> optuna.Study:
    return Driver(campaign, directory, resume=resume, **options).run()
