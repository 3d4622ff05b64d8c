"""Staging folders: where an output is written before it appears under its final name.

A merge writes ``.<out>.partial-...`` and an export ``.<out>.export-...`` beside the output,
and renames the finished folder into place, so nothing incomplete ever has the output's
name. A process killed with SIGKILL cannot remove its staging folder, which may hold a
complete-looking model; the next run for the same output removes the folders of dead
processes (``remove_stale_staging``).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
from pathlib import Path

# Staging folders are named ``.<out>.<kind>-<host>-<pid>-<token>``: a later run on the same
# host removes those whose process is gone (killed with SIGKILL, or the machine restarted),
# and never one of a live process or of another host sharing the filesystem.
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"   # no "-": parsed back


def staging_folder(out_dir: str | Path, kind: str) -> Path:
    """A new staging folder beside ``out_dir`` for this process (``kind``: partial, export)."""
    out = Path(out_dir)
    return _new_folder(out.parent, f".{out.name}.{kind}-{_HOST}-{os.getpid()}-")


def staging_path(out_dir: str | Path, kind: str) -> Path:
    """A staging name beside ``out_dir`` for this process, not created (for a writer that
    creates it, e.g. a merge into an export's staging folder)."""
    out = Path(out_dir)
    return out.parent / f".{out.name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_staging(out_dir: str | Path) -> list[Path]:
    """Remove the staging folders of ``out_dir`` left by dead processes of this host (also
    a merge's partial folder inside an export's staging name); the removed paths."""
    out = Path(out_dir)
    pattern = re.compile(rf"\.+{re.escape(out.name)}\..*?(partial|export)-(?P<host>[A-Za-z0-9._]+)"
                         rf"-(?P<pid>\d+)-[0-9a-f]{{8}}")
    removed = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m and m["host"] == _HOST and not _alive(int(m["pid"])) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # another user's process (EPERM): alive
        return True
    return True


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder with the usual permissions (0777 less the umask, where
    ``tempfile.mkdtemp`` would make it 0700 and the output would keep that)."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue
