"""Writing the files a campaign owns without following symbolic links.

A campaign directory may be shared (a group folder, a cluster's scratch space). Whoever can
write it could plant ``campaign.log -> ~/.bashrc``; the next user's command would then append
to, or overwrite, the link's target with that user's rights. So every file brmerge writes in a
campaign directory goes through here:

- appends open with ``O_NOFOLLOW`` (the kernel refuses a link as the last component);
- replacements write a fresh temporary file (``O_CREAT | O_EXCL | O_NOFOLLOW``) beside the
  target and rename it over the target, so a reader never sees half a file and a link is
  never written through;
- a link found where a campaign file or one of its folders should be is refused with one line
  (``CampaignFileError``), not silently replaced: it means someone else wrote the directory.

Folders above ``root`` (the campaign directory itself and its parents) are the user's choice
and are not checked.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path

from merge_core.errors import BrmergeError

FILE_MODE = 0o644   # as open() would create them under the usual umask


class CampaignFileError(BrmergeError):
    """A campaign file or folder is a symbolic link (or not a regular file): refused."""


def _refuse(path: Path, what: str) -> CampaignFileError:
    return CampaignFileError(f"refusing to write {path}: it is {what}, not a file brmerge wrote (someone who "
                             "can write the campaign directory may have planted it); remove it and run again")


def _check_folders(path: Path, root: Path | None) -> None:
    """No folder between ``root`` and ``path`` is a link (``root`` itself may be)."""
    if root is None:
        return
    try:
        rel = path.parent.relative_to(root)
    except ValueError:
        return   # a file outside the campaign directory (``report --out``): the user's choice
    current = root
    for part in rel.parts:
        current = current / part
        if current.is_symlink():
            raise _refuse(current, "a symbolic link to a folder")


def make_dir(path: Path, *, root: Path | None = None) -> Path:
    """``mkdir -p path``, refusing a link where a folder under ``root`` should be."""
    path = Path(path)
    _check_folders(path / "x", root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def open_no_follow(path: Path, flags: int) -> int:
    """``os.open(path, flags | O_CREAT | O_NOFOLLOW | O_CLOEXEC)``: a link as the last component
    is refused with one line (``CampaignFileError``) instead of being opened."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse(Path(path), "a symbolic link") from None
        raise


def append_text(path: Path, text: str, *, root: Path | None = None) -> None:
    """Append ``text`` (UTF-8) to ``path``, created if missing, never through a link."""
    path = Path(path)
    _check_folders(path, root)
    fd = open_no_follow(path, os.O_WRONLY | os.O_APPEND)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):   # a FIFO or device planted in its place
            raise _refuse(path, "not a regular file")
        data = text.encode("utf-8")
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def replace_bytes(path: Path, data: bytes, *, root: Path | None = None) -> Path:
    """Replace ``path`` with ``data`` atomically (temporary file, then rename), never through a link."""
    path = Path(path)
    _check_folders(path, root)
    if path.is_symlink():
        raise _refuse(path, "a symbolic link")
    if path.exists() and not path.is_file():
        raise _refuse(path, "not a regular file")
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)   # the rename must not publish a file whose blocks are not on disk yet
        finally:
            os.close(fd)
        os.replace(tmp, path)   # rename replaces a link planted since the check; it never follows it
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def replace_text(path: Path, text: str, *, root: Path | None = None) -> Path:
    """``replace_bytes`` of ``text`` in UTF-8."""
    return replace_bytes(path, text.encode("utf-8"), root=root)
