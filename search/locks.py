"""One live driver per campaign: a file lock in the campaign directory and a lease in the storage.

- **File lock** (``DIR/.brmerge.lock``, ``fcntl.flock``): the kernel drops it when the process
  dies, even by ``kill -9``, so a dead driver's lock is always free again. The file holds the
  holder's host, pid and start time, to name it in the error.
- **Lease** (a row of the ``brmerge_leases`` table in the study's database, when the storage is
  given): guards a shared database against a second driver started from another directory or
  host. A table rather than a study attribute because taking a lease must be atomic: the row is
  created with ``INSERT`` (the primary key refuses a second one) and taken over with a
  conditional ``UPDATE ... WHERE token = <the stale holder's>``, which only one contender can
  win; Optuna's attribute setters are blind upserts. The holder refreshes ``heartbeat`` every
  ``heartbeat_seconds``; a lease is stale when its holder's pid is gone on this host, or when
  its heartbeat is older than ``lease_seconds`` (hosts' clocks must agree within that, e.g.
  NTP). A stale lease is taken over; a live one is an error naming the driver.

Use::

    with locks.acquire(directory, location=loc, study_name=campaign.name) as lock:
        ...                     # lock.check() raises LockError if the lease was taken over
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from merge_core.errors import BrmergeError
from search.campaign_files import open_no_follow
from search.storage import StorageLocation, guard, mask_url

LOCK_FILE = ".brmerge.lock"
LEASE_TABLE = "brmerge_leases"
LEASE_SECONDS = 120.0      # a lease not refreshed for this long belongs to a dead (or hung) driver
HEARTBEAT_SECONDS = 30.0   # four heartbeats per lease: a slow database write does not lose it


class LockError(BrmergeError):
    """The campaign is in use by a live driver (named in the message), or its lease was lost."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float            # time.time() when the holder took the lock
    token: str = ""
    heartbeat: float = 0.0    # leases only: the holder's last refresh

    def describe(self, now: float | None = None) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        beat = f", last heartbeat {max(0, (now or time.time()) - self.heartbeat):.0f} s ago" if self.heartbeat else ""
        return f"pid {self.pid} on {self.host}, started {when}{beat}"


def _me() -> Holder:
    return Holder(host=socket.gethostname(), pid=os.getpid(), started=time.time(), token=uuid.uuid4().hex)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


# -- the file lock ------------------------------------------------------------------------------
def _read_holder(path: Path) -> Holder | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "null")
        return Holder(**data) if isinstance(data, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def _lock_file(directory: Path, me: Holder) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    # never through a link planted in a shared directory: ftruncate would empty its target
    fd = open_no_follow(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _read_holder(path)
        who = holder.describe() if holder else "a driver that is starting up"
        raise LockError(f"campaign {directory} is in use by a live driver ({who}): stop it first, "
                        "or wait for it to finish; --resume works once it has stopped") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(asdict(me)).encode())
    return fd


def _unlock_file(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # the file stays: removing it would let two contenders lock two inodes
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# -- the lease ----------------------------------------------------------------------------------
def _table() -> Any:
    import sqlalchemy as sa

    meta = sa.MetaData()
    return sa.Table(LEASE_TABLE, meta,
                    sa.Column("study_name", sa.String(512), primary_key=True),
                    sa.Column("token", sa.String(64), nullable=False),
                    sa.Column("host", sa.String(255), nullable=False),
                    sa.Column("pid", sa.Integer, nullable=False),
                    sa.Column("started", sa.Float, nullable=False),
                    sa.Column("heartbeat", sa.Float, nullable=False))


class _Lease:
    def __init__(self, location: StorageLocation | str, study_name: str, me: Holder, lease_seconds: float):
        import sqlalchemy as sa

        self.url = location.url if isinstance(location, StorageLocation) else location
        self.study_name, self.me, self.lease_seconds = study_name, me, lease_seconds
        kwargs: dict[str, Any] = ({"connect_args": {"timeout": 60}} if self.url.startswith("sqlite")
                                  else {"pool_pre_ping": True, "pool_size": 1, "max_overflow": 1})
        with guard(self.url, doing="open"):
            self.engine = sa.create_engine(self.url, **kwargs)
            self.table = _table()
            try:
                self.table.metadata.create_all(self.engine, checkfirst=True)
            except sa.exc.SQLAlchemyError:
                # two drivers creating the table at once: the loser's CREATE fails; fine if it exists
                if not sa.inspect(self.engine).has_table(LEASE_TABLE):
                    raise

    def _row(self, conn: Any) -> Holder | None:
        import sqlalchemy as sa

        t = self.table
        r = conn.execute(sa.select(t).where(t.c.study_name == self.study_name)).mappings().first()
        return None if r is None else Holder(host=r["host"], pid=r["pid"], started=r["started"],
                                             token=r["token"], heartbeat=r["heartbeat"])

    def stale(self, holder: Holder, now: float) -> bool:
        if now - holder.heartbeat > self.lease_seconds:
            return True
        return holder.host == self.me.host and not pid_alive(holder.pid)

    def acquire(self) -> Holder | None:
        """Takes the lease; returns the stale holder it took over (None if it was free)."""
        import sqlalchemy as sa

        t, me = self.table, self.me
        values = {"token": me.token, "host": me.host, "pid": me.pid, "started": me.started}
        with guard(self.url, doing="lock"):
            for _ in range(5):  # only lost races loop
                now = time.time()
                with self.engine.begin() as conn:
                    holder = self._row(conn)
                if holder is None:
                    try:
                        with self.engine.begin() as conn:
                            conn.execute(sa.insert(t).values(study_name=self.study_name, heartbeat=now, **values))
                        return None
                    except sa.exc.IntegrityError:
                        continue  # another driver inserted first: look again
                if not self.stale(holder, now):
                    raise LockError(f"study {self.study_name!r} in {mask_url(self.url)} is in use by a live "
                                    f"driver ({holder.describe(now)}): stop it first; a dead driver's lease "
                                    f"expires {self.lease_seconds:.0f} s after its last heartbeat")
                with self.engine.begin() as conn:
                    won = conn.execute(sa.update(t).where(t.c.study_name == self.study_name,
                                                          t.c.token == holder.token)
                                       .values(heartbeat=now, **values)).rowcount == 1
                if won:
                    return holder
        raise LockError(f"could not take the lease of study {self.study_name!r} in {mask_url(self.url)}: "
                        "other drivers keep starting; start one driver at a time")

    def beat(self) -> bool:
        """Refreshes the heartbeat; False if the lease is no longer ours (taken over)."""
        import sqlalchemy as sa

        t = self.table
        with guard(self.url, doing="refresh the lease in"), self.engine.begin() as conn:
            return conn.execute(sa.update(t).where(t.c.study_name == self.study_name, t.c.token == self.me.token)
                                .values(heartbeat=time.time())).rowcount == 1

    def release(self) -> None:
        import sqlalchemy as sa

        t = self.table
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.delete(t).where(t.c.study_name == self.study_name, t.c.token == self.me.token))
        except sa.exc.SQLAlchemyError:
            pass  # the database is gone: the lease expires on its own
        finally:
            self.engine.dispose()


# -- the lock -----------------------------------------------------------------------------------
class CampaignLock:
    """A held campaign lock (see ``acquire``). A context manager; ``release`` is idempotent."""

    def __init__(self, directory: Path, fd: int, holder: Holder, lease: _Lease | None,
                 heartbeat_seconds: float, took_over: Holder | None):
        self.directory, self.holder, self.took_over = directory, holder, took_over
        self._fd: int | None = fd
        self._lease = lease
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if lease is not None and heartbeat_seconds > 0:
            self._thread = threading.Thread(target=self._beat_loop, args=(heartbeat_seconds,),
                                            name="brmerge-lease", daemon=True)
            self._thread.start()

    @property
    def lost(self) -> bool:
        """True once another driver took the lease over (this one missed its heartbeats)."""
        return self._lost is not None

    def heartbeat(self) -> None:
        """Refreshes the lease now; raises LockError if another driver took it over."""
        if self._lease is not None and self._lost is None and not self._lease.beat():
            self._lost = (f"the lease of study {self._lease.study_name!r} was taken over by another driver "
                          f"(this one missed its heartbeats for {self._lease.lease_seconds:.0f} s): stop this "
                          "driver; the other one continues the campaign")
        self.check()

    def check(self) -> None:
        """Raises LockError if the lease was lost (call it between trials)."""
        if self._lost is not None:
            raise LockError(self._lost)

    def _beat_loop(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.heartbeat()
            except LockError:
                return
            except BrmergeError:
                continue  # the database is unreachable for now: try again at the next beat

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._fd is not None:
            _unlock_file(self._fd)
            self._fd = None

    def __enter__(self) -> CampaignLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(directory: Path, *, location: StorageLocation | str | None = None, study_name: str | None = None,
            lease_seconds: float = LEASE_SECONDS, heartbeat_seconds: float = HEARTBEAT_SECONDS) -> CampaignLock:
    """Locks the campaign in ``directory`` for this process, or raises ``LockError`` naming the
    live driver that holds it. With ``location`` and ``study_name`` it also takes the study's
    lease in that storage and refreshes it from a daemon thread every ``heartbeat_seconds``
    (0: only when ``heartbeat()`` is called). A stale lease is taken over (``took_over``)."""
    directory = Path(directory)
    me = _me()
    fd = _lock_file(directory, me)
    lease = None
    took_over = None
    try:
        if location is not None:
            if not study_name:
                raise ValueError("acquire(location=...) needs the study_name whose lease to take")
            lease = _Lease(location, study_name, me, lease_seconds)
            took_over = lease.acquire()
    except BaseException:
        if lease is not None:
            lease.engine.dispose()
        _unlock_file(fd)
        raise
    return CampaignLock(directory, fd, me, lease, heartbeat_seconds, took_over)
