"""The local executor: the workers run in this process, one thread per worker; no Ray.

For a single GPU box, the demo, and a GPU machine where Ray is not installed
(``workers: {executor: local}``). Nothing on this path imports ``ray``.

Why threads and not subprocesses: a worker spends its time in torch kernels (merging and
scoring), which release the GIL, so threads run side by side; the resident models are loaded
once per worker as with Ray, with no pickling of results between processes and nothing to
clean up after a crash of the driver (the workers die with it). What threads cannot give is
isolation: a worker that segfaults or is killed takes the campaign with it (use ``ray`` for
that), and a running stage cannot be cancelled, only abandoned (see ``close``). An abandoned
stage still ends before the process does (``_finish_abandoned``, at exit): a thread stopped
inside a torch kernel by the interpreter's shutdown aborts the whole process ("terminate
called without an active exception", exit 134) instead of exiting with its code.

Failures are reported as Ray's executor reports them: an exception escaping a worker's
``run`` (``TrialWorker.run`` itself never raises; an escape is a crash) ends that worker's
thread and becomes an ``Event`` with ``error``; the scheduler calls ``replace_worker``, which
starts a fresh worker, and queues the trial again. A ``KeyboardInterrupt`` or ``SystemExit``
raised in a worker is a stop, not a death: it is raised again in the scheduler's thread at its
next ``next_event``.
"""

from __future__ import annotations

import atexit
import os
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

from search.campaign import Campaign
from search.protocol import Event, Job, takes_digest


def local_plan(campaign: Campaign, *, n_workers: int | None = None) -> tuple[int, list[int | None], int | None]:
    """(count, each worker's CUDA device index or None for CPU, torch threads per CPU worker)."""
    import torch

    from merge_core.devices import cpu_cores

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpw = campaign.gpus_per_worker
    use_gpu = gpus > 0 and gpw > 0
    if n_workers:
        count = n_workers
    elif campaign.workers != "auto":
        count = int(campaign.workers)
    else:
        # torch's CPU thread pool is one per process: on CPU one worker takes all the cores
        count = max(1, int(gpus / gpw)) if use_gpu else 1
    if use_gpu:   # worker i on the GPU its share starts on (0.5 per worker: two per GPU)
        return count, [min(int(i * gpw), gpus - 1) for i in range(count)], None
    return count, [None] * count, max(1, cpu_cores() // count)


_ABANDONED: set[threading.Thread] = set()   # threads close() left in a running stage
_ABANDONED_LOCK = threading.Lock()


def _finish_abandoned() -> None:
    """At exit: wait for the stages ``close`` abandoned to end, so that no worker thread is
    inside a torch kernel when the interpreter shuts down (which aborts the process). A second
    Ctrl-C while waiting exits at once, with 130 and without that shutdown."""
    with _ABANDONED_LOCK:
        alive = [t for t in _ABANDONED if t.is_alive()]
    if not alive:
        return
    try:
        print(f"brmerge: {len(alive)} stopped worker(s) finishing a running stage before exit (a stage cannot "
              "be cancelled; what it returns is dropped); Ctrl-C again to exit now", file=sys.stderr, flush=True)
        for thread in alive:
            while thread.is_alive():
                thread.join(0.2)
    except KeyboardInterrupt:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


atexit.register(_finish_abandoned)


class _Slot:
    """One worker: its thread, its inbox, and what it reported when it loaded."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.ready = threading.Event()
        self.info: dict[str, Any] | None = None
        self.load_error: BaseException | None = None
        self.busy = False
        self.thread: threading.Thread | None = None


class LocalExecutor:
    """One thread per worker in this process; each hands itself its next job as it finishes."""

    def __init__(self, campaign: Campaign, *, n_workers: int | None = None,
                 worker_factory: Callable[..., Any] | None = None):
        self.campaign = campaign
        self.n_workers, self.devices, self.threads = local_plan(campaign, n_workers=n_workers)
        if worker_factory is None:
            from search.worker import TrialWorker

            worker_factory = TrialWorker
        self._factory = worker_factory
        self.resources: dict[str, Any] = {"executor": "local", "devices": [
            "cpu" if d is None else f"cuda:{d}" for d in self.devices], "threads": self.threads}
        self._lock = threading.Lock()
        self._events: queue.Queue[Event | None] = queue.Queue()
        self._handoff: Callable[[int], Job | None] = lambda worker: None
        self._stop: BaseException | None = None   # a KeyboardInterrupt/SystemExit from a worker
        self._closed = threading.Event()
        # the workers load their models now, as Ray's actors do when created
        self._slots = [self._spawn(i) for i in range(self.n_workers)]

    def _spawn(self, index: int) -> _Slot:
        slot = _Slot()
        slot.thread = threading.Thread(target=self._serve, args=(index, slot), daemon=True,
                                       name=f"brmerge-worker-{index}")
        slot.thread.start()
        return slot

    def wait_ready(self, check: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
        """Wait until every worker has loaded its models; their ``info()``. ``check`` is called
        about twice a second meanwhile (it raises to stop the wait). A worker that failed to
        load raises its error here."""
        for slot in list(self._slots):
            while not slot.ready.wait(0.5):
                check()
            if slot.load_error is not None:
                raise slot.load_error
        return [dict(slot.info or {}) for slot in self._slots]

    # -- the Executor protocol ----------------------------------------------------------------
    def start(self, handoff: Callable[[int], Job | None]) -> None:
        self._handoff = handoff

    def submit(self, job: Job) -> None:
        with self._lock:
            self._slots[job.worker].inbox.put(job)

    def next_event(self, timeout: float) -> Event | None:
        try:
            event = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            event = None
        if self._stop is not None:
            stop, self._stop = self._stop, None
            raise stop
        return event

    def replace_worker(self, worker: int) -> None:
        """A fresh worker in place of a dead one; jobs already submitted to the dead one's
        index (the scheduler resubmits after this call) go to the new one."""
        with self._lock:
            old = self._slots[worker]
            self._slots[worker] = self._spawn(worker)
            while True:   # anything the dead thread never took
                try:
                    job = old.inbox.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    self._slots[worker].inbox.put(job)
            old.inbox.put(None)   # a thread still waiting there (one that failed to load) ends

    def close(self) -> None:
        """Stop every worker: an idle one ends now; a busy one ends when its current stage
        returns (a thread cannot be cancelled), and its result is dropped. Waits for the idle
        ones only, so that a stop is not held up by a long evaluation; the threads are daemons,
        so a busy one does not hold up the stop: it is waited for only when the process exits
        (``_finish_abandoned``)."""
        self._closed.set()
        with self._lock:
            slots = list(self._slots)
        for slot in slots:
            slot.inbox.put(None)
        for slot in slots:
            thread = slot.thread
            if thread is None or thread is threading.current_thread():
                continue
            if not slot.busy:
                thread.join(timeout=5.0)
            if thread.is_alive():   # in a stage, or still loading its models
                with _ABANDONED_LOCK:
                    _ABANDONED.difference_update([t for t in _ABANDONED if not t.is_alive()])
                    _ABANDONED.add(thread)

    # -- a worker's thread --------------------------------------------------------------------
    def _serve(self, index: int, slot: _Slot) -> None:
        device = self.devices[index]
        try:
            if device is not None:   # the current CUDA device is per thread: "cuda" is this one
                import torch

                torch.cuda.set_device(device)
            worker = self._factory(self.campaign, index, threads=self.threads)
            info = getattr(worker, "info", None)
            slot.info = info() if callable(info) else {"worker": index, "device": "cpu"}
            with_digest = takes_digest(worker.run)
        except BaseException as exc:  # noqa: BLE001 - wait_ready raises it; a job gets a dead-worker event
            slot.load_error = exc
            slot.ready.set()
            self._fail_pending(slot, f"worker {index} failed to load: {type(exc).__name__}: {exc}")
            return
        slot.ready.set()
        while True:
            job = slot.inbox.get()
            slot.busy = True   # before the check: close() must not wait for a stage begun now
            if job is None or self._closed.is_set():
                return
            try:
                if with_digest:
                    result = worker.run(job.recipe_yaml, stage=job.stage, digest=job.digest)
                else:
                    result = worker.run(job.recipe_yaml, stage=job.stage)
            except Exception as exc:  # noqa: BLE001 - a crash of the worker: it is replaced
                if not self._closed.is_set():
                    self._events.put(Event(job, error=f"{type(exc).__name__}: {exc}"))
                return
            except BaseException as exc:  # KeyboardInterrupt, SystemExit: stop the scheduler
                self._stop = exc
                self._events.put(None)   # wake a waiting next_event
                return
            finally:
                slot.busy = False
            if self._closed.is_set():
                return
            handed = False
            if result.final or result.failed:   # the worker is free: its next job first
                nxt = self._handoff(index)
                if nxt is not None:
                    self.submit(nxt)
                    handed = True
            self._events.put(Event(job, result=result, handed=handed))

    def _fail_pending(self, slot: _Slot, error: str) -> None:
        """A worker that could not load: each job sent to it is a dead-worker event (as Ray
        reports an actor whose constructor raised), so the scheduler replaces it and retries."""
        while not self._closed.is_set():
            job = slot.inbox.get()
            if job is None:
                return
            self._events.put(Event(job, error=error))
