"""The local cluster ``start_ray`` starts, seen from outside: every listening socket on
127.0.0.1, no metrics exporter, never another cluster (``ray start --head``, ``RAY_ADDRESS``),
and nothing left a few seconds after its driver dies by SIGKILL.

Each test runs its driver in a subprocess (Ray reads its switches when first imported) and
selects processes by that driver's descendants or by the session of the ``ray start`` it
launched, never by name: other Ray clusters may run on the same machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

# not imported here: Ray reads its switches when first imported, in the drivers below
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray")]
REPO = Path(__file__).resolve().parents[2]
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}

# A driver: starts the local cluster, runs one task (a worker process exists), prints the
# cluster's address, its session directory and the pids of every process it started, then
# waits for stdin to close.
DRIVER = """
import json, os, sys
from search.executor import start_ray
start_ray(os.environ.get("BRMERGE_TEST_RAY_ADDRESS"), num_cpus=1)
import psutil, ray
@ray.remote
def pid():
    return os.getpid()
worker = ray.get(pid.remote())
ctx = ray.get_runtime_context()
print(json.dumps({"gcs": ctx.gcs_address, "node_ip": ray.util.get_node_ip_address(),
                  "worker": worker, "driver": os.getpid(),
                  "pids": [p.pid for p in psutil.Process().children(recursive=True)]}), flush=True)
sys.stdin.read()
ray.shutdown()
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO), **extra)
    return env


def _start_driver(**env: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO, env=_env(**env), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        pytest.fail(f"the driver exited with {proc.wait()} before starting Ray")
    return proc, json.loads(line)


def _procs(pids: list[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return out


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _listening(procs: list[psutil.Process]) -> list[tuple[str, int, str]]:
    """(address, port, process) of every listening TCP socket of ``procs``."""
    out = []
    for p in _alive(procs):
        try:
            name = p.name()
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((c.laddr.ip, c.laddr.port, name))
        except psutil.NoSuchProcess:
            pass
    return out


def _stop(proc: subprocess.Popen, pids: list[int]) -> None:
    """Close the driver's stdin (a clean ``ray.shutdown``), then kill whatever is left of it."""
    procs = _procs(pids)
    try:
        proc.stdin.close()
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for p in _alive(procs):
        p.kill()


def _session_dir(procs: list[psutil.Process]) -> Path:
    for p in procs:
        for arg in p.cmdline():
            if arg.startswith("--session-dir="):
                return Path(arg.split("=", 1)[1])
    raise AssertionError("no Ray process names its session directory")


def test_the_local_cluster_listens_on_loopback_only_and_exports_no_metrics():
    proc, info = _start_driver()
    try:
        assert info["node_ip"] == "127.0.0.1"
        assert info["gcs"].startswith("127.0.0.1:")
        time.sleep(3)   # the agents open their servers after the node registers
        procs = _procs([info["driver"], *info["pids"]])
        # the workers and agents the raylet started since
        procs += [c for p in _alive(procs) for c in p.children(recursive=True) if c.pid not in info["pids"]]
        listening = _listening(procs)
        names = {name for _, _, name in listening}
        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, listening
        assert int(info["gcs"].rsplit(":", 1)[1]) in {port for _, port, _ in listening}
        exposed = [s for s in listening if s[0] not in LOOPBACK]
        assert exposed == [], f"listening beyond loopback: {exposed}"
        # _system_config enable_metrics_collection=False: the agent opened no Prometheus exporter
        ports = list(_session_dir(procs).glob("metrics_export_port_*"))
        assert ports and all(p.read_text().strip() == "-1" for p in ports)
    finally:
        _stop(proc, info["pids"])


def test_a_driver_killed_by_sigkill_leaves_nothing_of_its_cluster():
    proc, info = _start_driver()
    procs = _procs(info["pids"])
    time.sleep(2)   # the agents are up (they are the ones that outlived a dead driver)
    procs += [c for p in _alive(procs) for c in p.children(recursive=True) if c.pid not in info["pids"]]
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= {p.name() for p in procs}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    died = time.monotonic()
    while _alive(procs) and time.monotonic() - died < 10:
        time.sleep(0.2)
    left = [(p.pid, p.name()) for p in _alive(procs)]
    for p in _alive(procs):
        p.kill()
    assert left == [], f"still alive 10 s after the driver's death: {left}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_of(sid: int) -> list[psutil.Process]:
    """Every process of the session ``sid`` (what ``ray start`` below started, workers included)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.pid != os.getpid():
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return out


@pytest.fixture()
def ray_start_head():
    """``ray start --head`` as a user would have left it (its address in /tmp/ray too), in a
    session of its own; stopped by killing that session only (``ray stop`` would stop every
    Ray cluster on the machine)."""
    port = _free_port()
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}", "--num-cpus=1",
           "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats", "--block"]
    # on loopback too (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0): the test exposes nothing either
    head = subprocess.Popen(cmd, env=_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(port == c.laddr.port for p in _session_of(head.pid) for c in _safe_listen(p)):
                break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(0.5)
        else:
            pytest.fail("ray start --head did not listen in 60 s")
        yield f"127.0.0.1:{port}"
    finally:
        members = _session_of(head.pid)
        for p in members:
            try:
                p.kill()
            except psutil.Error:
                pass
        head.wait(timeout=30)
        psutil.wait_procs(members, timeout=10)
        current = Path("/tmp/ray/ray_current_cluster")   # what `ray stop` would have removed
        if current.is_file() and current.read_text().strip() == f"127.0.0.1:{port}":
            current.unlink(missing_ok=True)


def _safe_listen(p: psutil.Process) -> list:
    try:
        return [c for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    except psutil.Error:
        return []


@pytest.mark.parametrize("with_ray_address", [False, True], ids=["ray-start-head", "RAY_ADDRESS"])
def test_without_an_address_a_new_cluster_is_started_never_an_existing_one(ray_start_head, with_ray_address):
    env = {"RAY_ADDRESS": ray_start_head} if with_ray_address else {}
    proc, info = _start_driver(**env)
    try:
        assert info["gcs"] != ray_start_head
        # the driver's cluster is its own: its GCS is one of the processes it started
        gcs_port = int(info["gcs"].rsplit(":", 1)[1])
        mine = _listening(_procs(info["pids"]))
        assert ("gcs_server", gcs_port) in {(name, port) for _, port, name in mine}
    finally:
        _stop(proc, info["pids"])


def test_a_campaign_address_on_loopback_joins_that_cluster(ray_start_head):
    """``ray.address: 127.0.0.1:PORT`` (a ``ray start --head`` on loopback) is joined as given."""
    proc, info = _start_driver(BRMERGE_TEST_RAY_ADDRESS=ray_start_head)
    try:
        assert info["gcs"] == ray_start_head
        assert not [p for p in _procs(info["pids"]) if p.name() in ("gcs_server", "raylet")]
    finally:
        _stop(proc, info["pids"])
