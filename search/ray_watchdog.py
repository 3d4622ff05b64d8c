"""The local Ray cluster's watchdog: when the driver that started the cluster dies (SIGKILL
included), every process of that cluster is killed within about a second.

``search.executor.start_ray`` runs this file as a script (stdlib and psutil only, so it starts
fast and needs no import path) right after ``ray.init`` started a local cluster, with the
driver's pid and the cluster's root processes (the children ``ray.init`` spawned: GCS, raylet,
dashboard head, monitors). Why it is needed in Ray 2.60: the roots die with the driver
(Ray sets ``PR_SET_PDEATHSIG`` on them), but the raylet's children do not; the dashboard and
runtime-env agents notice the raylet's death, then try to report it to the dead GCS and stay
alive (and listening) for about a minute.

While the driver lives, the watchdog records the roots' descendants every 0.2 s. When the
driver dies it kills (SIGKILL) every recorded process still alive, and every process whose
``RAY_RAYLET_PID`` names one of the cluster's raylets (workers and agents born since the last
look). When the roots are all gone while the driver lives (``ray.shutdown``), it does the
same for what is left and exits.

    python ray_watchdog.py DRIVER_PID PID:CREATE_TIME [PID:CREATE_TIME ...]
"""

from __future__ import annotations

import os
import signal
import sys
import time

import psutil

POLL_SECONDS = 0.2


def _same(proc: psutil.Process, created: float) -> bool:
    """The process is still the one recorded (not a reused pid) and not a zombie."""
    try:
        return abs(proc.create_time() - created) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Tracked:
    def __init__(self, roots: dict[int, float]):
        self.procs: dict[int, tuple[psutil.Process, float]] = {}
        self.raylets: set[int] = set()
        for pid, created in roots.items():
            try:
                self.procs[pid] = (psutil.Process(pid), created)
            except psutil.Error:
                pass
        self.roots = set(self.procs)

    def alive(self, pids: set[int] | None = None) -> list[psutil.Process]:
        return [p for pid, (p, c) in self.procs.items() if (pids is None or pid in pids) and _same(p, c)]

    def look(self) -> None:
        """Add the descendants of the live roots (every process the cluster started is one)."""
        for proc in self.alive(self.roots):
            try:
                children = proc.children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                if child.pid in self.procs:
                    continue
                try:
                    self.procs[child.pid] = (child, child.create_time())
                    if child.name() == "raylet":
                        self.raylets.add(child.pid)
                except psutil.Error:
                    pass
        for pid in self.roots:
            proc, created = self.procs[pid]
            try:
                if pid not in self.raylets and _same(proc, created) and proc.name() == "raylet":
                    self.raylets.add(pid)
            except psutil.Error:
                pass

    def born_of_raylets(self) -> list[psutil.Process]:
        """Processes the cluster's raylets started and the last look missed."""
        found = []
        if not self.raylets:
            return found
        wanted = {str(pid) for pid in self.raylets}
        uid = os.getuid()
        for proc in psutil.process_iter(["uids"]):
            try:
                if proc.pid in self.procs or proc.info["uids"] is None or proc.info["uids"].real != uid:
                    continue
                if proc.environ().get("RAY_RAYLET_PID") in wanted:
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def kill_all(self) -> None:
        victims = self.alive() + self.born_of_raylets()
        for proc in victims:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_running(p) for p in victims):
            time.sleep(0.05)   # gone, or a zombie its new parent has not reaped yet


def watch(driver: int, roots: dict[int, float]) -> None:
    tracked = Tracked(roots)
    while True:
        tracked.look()
        if os.getppid() != driver or not psutil.pid_exists(driver):
            break   # the driver died (this process was re-parented)
        if not tracked.alive(tracked.roots):
            break   # the cluster was shut down while the driver lives
        time.sleep(POLL_SECONDS)
    tracked.kill_all()


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the driver's to handle
    signal.signal(signal.SIGHUP, signal.SIG_IGN)   # a closed terminal must not end the watch
    driver = int(argv[0])
    roots = {int(pid): float(created) for pid, created in (a.split(":", 1) for a in argv[1:])}
    watch(driver, roots)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
