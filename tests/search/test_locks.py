"""search.locks: one live driver per campaign (file lock + storage lease), stale takeover."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from search import locks as L

REPO = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
from search import locks
lock = locks.acquire(sys.argv[1], location=sys.argv[2] or None, study_name="camp", heartbeat_seconds=0.2)
print("locked", flush=True)
time.sleep(600)
"""


def _holder(directory: Path, url: str = "") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), url], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        raise AssertionError(f"holder did not lock: {line!r} {proc.communicate()[1][-2000:]}")
    return proc


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def _rows(url: str) -> list[dict]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {L.LEASE_TABLE}")).mappings()]
    finally:
        engine.dispose()


def test_second_process_is_refused_with_the_live_driver_named_then_takes_over_after_kill9(tmp_path):
    directory = tmp_path / "camp"
    proc = _holder(directory)
    try:
        with pytest.raises(L.LockError) as err:
            L.acquire(directory)
        msg = str(err.value)
        assert f"pid {proc.pid} on {socket.gethostname()}, started " in msg and "\n" not in msg
    finally:
        _kill9(proc)
    with L.acquire(directory) as lock:  # the kernel released the dead holder's lock
        assert lock.holder.pid == os.getpid()
        with pytest.raises(L.LockError, match=f"pid {os.getpid()}"):
            L.acquire(directory)  # a second driver in the same process is refused too
    with L.acquire(directory):
        pass  # released on exit


def test_lease_refuses_a_live_driver_of_another_directory_and_takes_over_a_dead_one(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    proc = _holder(tmp_path / "a", url)
    try:
        # another directory, same study in the same storage: the lease refuses it
        with pytest.raises(L.LockError) as err:
            L.acquire(tmp_path / "b", location=url, study_name="camp")
        assert f"study 'camp' in {url} is in use by a live driver (pid {proc.pid}" in str(err.value)
        (row,) = _rows(url)
        assert row["pid"] == proc.pid
        time.sleep(0.6)
        assert _rows(url)[0]["heartbeat"] > row["heartbeat"]  # the holder's thread refreshes it
        assert not (tmp_path / "b" / L.LOCK_FILE).read_text()  # the refused one left its file unlocked
    finally:
        _kill9(proc)
    # dead pid on this host: taken over at once
    with L.acquire(tmp_path / "b", location=url, study_name="camp", heartbeat_seconds=0) as lock:
        assert lock.took_over is not None and lock.took_over.pid == proc.pid
        assert _rows(url)[0]["pid"] == os.getpid()
    assert _rows(url) == []  # released


def test_expired_heartbeat_of_another_host_is_taken_over_and_the_loser_learns_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = L.acquire(tmp_path / "a", location=url, study_name="camp", lease_seconds=5, heartbeat_seconds=0)
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:  # the holder seems to run elsewhere and to have stopped beating
            conn.execute(sa.text(f"UPDATE {L.LEASE_TABLE} SET host='elsewhere', heartbeat=heartbeat-3"))
        with pytest.raises(L.LockError, match="on elsewhere"):
            L.acquire(tmp_path / "b", location=url, study_name="camp", lease_seconds=5, heartbeat_seconds=0)
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {L.LEASE_TABLE} SET heartbeat=heartbeat-10"))
        second = L.acquire(tmp_path / "b", location=url, study_name="camp", lease_seconds=5, heartbeat_seconds=0)
        assert second.took_over is not None and second.took_over.host == "elsewhere"
        with pytest.raises(L.LockError, match="taken over by another driver"):
            first.heartbeat()
        assert first.lost and not second.lost
        second.heartbeat()
        first.release()  # does not drop the other driver's lease
        assert _rows(url)[0]["token"] == second.holder.token
        second.release()
    finally:
        engine.dispose()


def test_dead_pid_is_dead_and_a_zombie_too(tmp_path):
    assert L.pid_alive(os.getpid())
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert not L.pid_alive(proc.pid)
    proc.wait()
    assert not L.pid_alive(proc.pid)
