"""Ray: the cluster, the workers and their placement, and the dispatcher.

``start_ray`` is the one place a Ray cluster is started or joined (the driver, the demo, the
perf scripts and the tests use it). ``RayExecutor`` implements the scheduler's ``Executor``
protocol with one Ray actor per worker and a dispatcher thread that hands a finishing worker
its next job (through the scheduler's ``handoff``) before the scheduler records the result.

A watch thread checks the cluster every ``CLUSTER_CHECK_S``: the local cluster's own processes
(GCS, raylet) by pid, and, for any cluster, that the GCS answers and still counts this
machine's node alive. Ray itself would only report the workers' actors dead, after its health
checks give up on the node (tens of seconds), and the replacements would then wait forever for
a node; instead ``wait_ready`` and ``next_event`` raise ``ClusterLost`` and the driver stops as
on Ctrl-C. Bounds: a few seconds for the local cluster, ``CLUSTER_PROBE_TIMEOUT_S`` plus Ray's
own node health check (about 30 s in all) for a joined one.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from search.campaign import Campaign
from search.protocol import ClusterLost, Event, Job, takes_digest


LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
WATCHDOG = Path(__file__).with_name("ray_watchdog.py")
CLUSTER_CHECK_S = 1.0          # how often the watch looks: a pid check and one GCS call, cheap
CLUSTER_PROBE_TIMEOUT_S = 20.0  # a GCS silent this long is gone (a busy one answers in milliseconds)
# the local cluster's root processes (pid, create time, name), recorded by _start_local
_LOCAL_ROOTS: list[tuple[int, float, str]] = []


def start_ray(address: str | None = None, *, num_cpus: int | None = None,
              runtime_env: dict[str, Any] | None = None) -> bool:
    """Join the cluster at ``address``, or start a private local one on this machine.

    Without an address this always starts a new cluster (``address="local"``): it never joins
    one that ``ray start`` left on the machine, nor the one ``RAY_ADDRESS`` names. That cluster
    listens on 127.0.0.1 only, starts no metrics exporter, and a watchdog kills all of it within
    about a second of this process dying, SIGKILL included (``search/ray_watchdog.py``).
    Returns False when Ray was already initialized in this process (the caller then must not
    shut it down).
    """
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # a cluster of this process only
    if address:
        host = (address.rpartition(":")[0] or address).strip("[]")
        if host in ("127.0.0.1", "localhost", "::1") and "ray" not in sys.modules:
            # a cluster on this machine's loopback: Ray 2.60 would rewrite the address into the
            # host's and fail to connect, unless this is set before ray is imported (_start_local)
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray

        if ray.is_initialized():
            return False
        ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
        return True
    return _start_local(num_cpus=num_cpus, runtime_env=runtime_env)


def _start_local(*, num_cpus: int | None, runtime_env: dict[str, Any] | None) -> bool:
    # Ray 2.60 on Linux turns a loopback node address into the host's address
    # (services.resolve_ip_for_localhost) unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER is false,
    # and every server of the node (GCS, raylet, object manager, workers, dashboard and
    # runtime-env agents, metrics) binds 0.0.0.0 unless the node address is loopback. No other
    # bind setting exists in 2.60. Ray reads this variable once, when ``ray`` is first
    # imported: ray must not be imported before this call (the CLI and the driver import it
    # only here); a cluster started otherwise keeps Ray's default and a warning says so.
    imported_before = "ray" in sys.modules
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")   # no usage report leaves the machine
    import psutil
    import ray

    if ray.is_initialized():
        return False
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    # enable_metrics_collection=False (a _system_config key; Ray 2.60 has no public switch):
    # the raylet starts the dashboard agent with --disable-metrics-collection, so no
    # Prometheus exporter port is opened. include_dashboard=False: no dashboard UI or HTTP API.
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             _node_ip_address="127.0.0.1", log_to_driver=False, runtime_env=runtime_env,
             _system_config={"enable_metrics_collection": False})
    _LOCAL_ROOTS[:] = _identify([p for p in me.children() if p.pid not in before])
    _start_watchdog(me, _LOCAL_ROOTS)
    node_ip = ray.util.get_node_ip_address()
    if node_ip not in LOOPBACK:
        warnings.warn(f"the local Ray cluster listens on {node_ip}, not only on 127.0.0.1: ray was "
                      "imported before search.executor.start_ray could set "
                      "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; call start_ray before importing ray"
                      if imported_before else
                      f"the local Ray cluster listens on {node_ip}, not only on 127.0.0.1",
                      RuntimeWarning, stacklevel=3)
    return True


def _identify(procs: list[Any]) -> list[tuple[int, float, str]]:
    """(pid, create time, name) of each process still alive (one that already exited is left out)."""
    import psutil

    out = []
    for proc in procs:
        try:
            out.append((proc.pid, proc.create_time(), proc.name()))
        except psutil.Error:
            continue
    return out


def local_cluster_problem() -> str | None:
    """Which of the local cluster's GCS and raylet processes died (None: all alive, or no
    local cluster was started here)."""
    import psutil

    for pid, created, name in _LOCAL_ROOTS:
        if not any(k in name for k in ("raylet", "gcs_server")):
            continue   # the dashboard head and monitors may come and go
        try:
            proc = psutil.Process(pid)
            gone = abs(proc.create_time() - created) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            gone = True
        if gone:
            return f"its {name} process, pid {pid}, died"
    return None


def gcs_problem(node_id: str | None, *, timeout: float = CLUSTER_PROBE_TIMEOUT_S) -> str | None:
    """Whether the cluster's GCS answers within ``timeout`` and counts ``node_id`` (the node
    this process is attached to) alive; None when it does."""
    import ray

    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            answer["nodes"] = ray.nodes()
        except Exception as exc:  # noqa: BLE001 - any failure to answer is the finding
            answer["error"] = exc

    probe = threading.Thread(target=ask, name="brmerge-gcs-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    if probe.is_alive():
        return f"its GCS did not answer for {timeout:.0f} s"
    if "error" in answer:
        return f"its GCS cannot be reached ({type(answer['error']).__name__})"
    nodes = answer["nodes"]
    if not any(n.get("Alive") for n in nodes):
        return "no node of it is alive"
    mine = [n for n in nodes if n.get("NodeID") == node_id]
    if node_id and mine and not mine[0].get("Alive"):
        return "this machine's node (its raylet) was marked dead"
    return None


_WATCHDOGS: list[subprocess.Popen] = []   # kept, so that each is reaped when it ends


def _start_watchdog(driver: Any, roots: list[tuple[int, float, str]]) -> None:
    """Start ``ray_watchdog.py`` for the cluster whose root processes are ``roots`` (``_identify``)."""
    args = [f"{pid}:{created!r}" for pid, created, _ in roots]
    # its own session: a Ctrl-C or a kill of the driver's process group leaves the watchdog
    # alive to clean up; it exits with the cluster or after the driver's death.
    _WATCHDOGS[:] = [w for w in _WATCHDOGS if w.poll() is None]
    _WATCHDOGS.append(subprocess.Popen(
        [sys.executable, str(WATCHDOG), str(driver.pid), *args], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True))


def worker_plan(campaign: Campaign, *, n_workers: int | None = None) -> tuple[int, dict[str, Any], int | None]:
    """(count, actor resources, torch threads) from the cluster's resources and the campaign."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    cpus = int(res.get("CPU", 1))
    use_gpu = gpus > 0 and campaign.gpus_per_worker > 0
    if n_workers:
        count = n_workers
    elif campaign.workers == "auto":
        count = max(1, int(gpus / campaign.gpus_per_worker)) if use_gpu else max(1, cpus // 2)
    else:
        count = int(campaign.workers)
    if use_gpu:
        return count, {"num_gpus": campaign.gpus_per_worker, "num_cpus": 1}, None
    per = max(1, cpus // count)
    # OpenMP threads of torch spin after each parallel region and take the cores from each
    # other (and from other workers); passive waiting must be set before the OpenMP runtime
    # loads, so it goes into the worker's environment.
    return count, {"num_cpus": min(per, cpus) if count <= cpus else cpus / count,
                   "runtime_env": {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}}, per


class RayExecutor:
    """One Ray actor per worker; a dispatcher thread watches the running stages."""

    def __init__(self, campaign: Campaign, *, n_workers: int | None = None,
                 worker_factory: Callable[..., Any] | None = None):
        import ray

        self.campaign = campaign
        self.n_workers, self.resources, self.threads = worker_plan(campaign, n_workers=n_workers)
        if worker_factory is None:
            from search.worker import TrialWorker

            worker_factory = TrialWorker
        # SPREAD: the workers go to as many nodes as the cluster has (memory and cores of each
        # node shared by fewer workers); a replacement goes wherever its resources are free.
        self._with_digest = takes_digest(getattr(worker_factory, "run", lambda *a, digest=None, **k: None))
        self._cls = ray.remote(max_restarts=0, max_concurrency=1, scheduling_strategy="SPREAD",
                               **self.resources)(worker_factory)
        self.actors = [self._actor(i) for i in range(self.n_workers)]
        self._info_refs = [a.info.remote() for a in self.actors]
        self._lock = threading.Lock()
        self._in_flight: dict[Any, Job] = {}
        self._events: queue.Queue[Event] = queue.Queue()
        self._handoff: Callable[[int], Job | None] = lambda worker: None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._dispatch, name="brmerge-dispatch", daemon=True)
        self._lost: str | None = None   # set by the watch: why the cluster is gone
        self._node_id = ray.get_runtime_context().get_node_id()
        self._watch = threading.Thread(target=self._watch_cluster, name="brmerge-cluster-watch", daemon=True)
        self._watch.start()

    def _actor(self, index: int):
        return self._cls.remote(self.campaign, index, threads=self.threads)

    def wait_ready(self, check: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
        """Wait until every worker has loaded its models; their ``info()``. ``check`` is called
        about twice a second meanwhile (it raises to stop the wait)."""
        import ray

        pending = list(self._info_refs)
        while pending:
            check()
            self._check_cluster()
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        return ray.get(self._info_refs)

    # -- the Executor protocol ----------------------------------------------------------------
    def start(self, handoff: Callable[[int], Job | None]) -> None:
        self._handoff = handoff
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            run = self.actors[job.worker].run
            ref = (run.remote(job.recipe_yaml, stage=job.stage, digest=job.digest) if self._with_digest
                   else run.remote(job.recipe_yaml, stage=job.stage))
            self._in_flight[ref] = job

    def next_event(self, timeout: float) -> Event | None:
        self._check_cluster()
        try:
            return self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            return None

    def replace_worker(self, worker: int) -> None:
        with self._lock:
            self.actors[worker] = self._actor(worker)

    def close(self) -> None:
        import ray

        self._closed.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        for actor in self.actors if self._lost is None else ():   # a lost cluster took them along
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already dead
                pass

    # -- the cluster watch ------------------------------------------------------------------------
    def _watch_cluster(self) -> None:
        while not self._closed.wait(CLUSTER_CHECK_S):
            problem = local_cluster_problem() or gcs_problem(self._node_id)
            if problem:
                self._lost = problem
                return

    def _check_cluster(self) -> None:
        if self._lost is not None:
            raise ClusterLost(f"the Ray cluster is gone ({self._lost}): the trials it was running are "
                              "queued again; start Ray again (or fix ray.address) and continue with --resume")

    # -- the dispatcher thread ----------------------------------------------------------------
    def _dispatch(self) -> None:
        import ray

        while not self._closed.is_set():
            with self._lock:
                refs = list(self._in_flight)
            if not refs:
                self._closed.wait(0.005)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.05)   # releases the GIL while it waits
            for ref in ready:
                with self._lock:
                    job = self._in_flight.pop(ref, None)
                if job is None:
                    continue
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                        ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError) as exc:
                    # the worker, its node, or the node holding its result is gone: run it again
                    self._events.put(Event(job, error=type(exc).__name__))
                    continue
                handed = False
                if result.final or result.failed:   # the worker is free: its next job first
                    nxt = self._handoff(job.worker)
                    if nxt is not None:
                        self.submit(nxt)
                        handed = True
                self._events.put(Event(job, result=result, handed=handed))
