"""Study storage: where a campaign's study lives, its credentials, and opening it.

Credentials never leave this module. A storage URL is resolved here (the campaign's
``storage:``, a password from the environment, or ``$BRMERGE_STORAGE_URL``); everything that
prints or stores a URL uses ``mask_url`` (the password becomes ``***``), and the campaign
stored in the study goes through ``public_campaign``.

Where the password comes from, first match wins:

1. ``$BRMERGE_STORAGE_URL``: the whole URL, for every campaign run from that environment.
2. ``storage: {url: postgresql+psycopg://user@host/db, password_env: PGPASS}``: the password
   is read from ``$PGPASS``, so the campaign file can be committed.
3. ``storage: postgresql+psycopg://user:password@host/db`` (works, but keeps the secret in the
   file), or a URL without a password that the driver completes itself (libpq reads
   ``$PGPASSWORD`` and ``~/.pgpass``).
4. ``storage: null``: a SQLite file, ``study.db``, in the campaign directory.

Opening errors (database gone, wrong password, driver missing, disk full) become a
``StorageError``: one line with the masked URL and the fix.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from merge_core.errors import BrmergeError
from search.campaign import Campaign, load_campaign

ENV_URL = "BRMERGE_STORAGE_URL"      # the whole storage URL, password included
MASK = "***"
SQLITE_TIMEOUT_S = 60                # wait for another process' write lock rather than fail
SCHEMA_RACE_TRIES = 5                # opening a new database while another process creates its tables
# what SQLite and PostgreSQL say when two processes create Optuna's schema at once
_SCHEMA_RACE_MESSAGES = ("already exists", "alembic_version", "duplicate key value")
POSTGRES_EXTRA = "pip install 'brmerge[postgres]'"


class StorageError(BrmergeError):
    """The study storage cannot be opened or used; the message shows the URL masked."""


# -- URLs and credentials ----------------------------------------------------------------------
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:@/]*):(?P<pw>[^@/]*)@")
_QUERY_PW = re.compile(r"(?i)([?&]password=)[^&]*")


def mask_url(url: str) -> str:
    """``url`` with its password (in the user part or a ``password=`` query) shown as ``***``."""
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", url, count=1)
    return _QUERY_PW.sub(lambda m: m.group(1) + MASK, out)


_URL_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:@/\s'\"]*):(?P<pw>[^@/\s'\"]*)@")


def mask_text(text: str) -> str:
    """``text`` (a campaign file, a log line) with the password of every URL in it masked."""
    return _QUERY_PW.sub(lambda m: m.group(1) + MASK, _URL_USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text))


def _password(url: str) -> str | None:
    m = _USERINFO.match(url)
    return m["pw"] if m and m["pw"] else None


def scrub(text: str, url: str) -> str:
    """``text`` (an error message) with the URL masked and its password nowhere in it."""
    out = text.replace(url, mask_url(url))
    pw = _password(url)
    if pw:
        out = out.replace(pw, MASK)
        from urllib.parse import unquote

        out = out.replace(unquote(pw), MASK)
    return out


@dataclass(frozen=True)
class StorageLocation:
    """A resolved storage URL. ``url`` holds the password: hand it only to a database driver;
    ``str()``, ``repr()`` and ``public`` show it masked."""

    url: str = field(repr=False)
    source: str = "campaign"          # "campaign" | "$BRMERGE_STORAGE_URL" | "default"

    @property
    def public(self) -> str:
        return mask_url(self.url)

    def __str__(self) -> str:
        return self.public

    def __repr__(self) -> str:
        return f"StorageLocation({self.public!r}, source={self.source!r})"


DEFAULT_DB = "study.db"   # a campaign without storage: one SQLite file beside its campaign.yaml


def default_url(directory: Path) -> str:
    """The SQLite URL of a campaign without ``storage`` (absolute: the driver may change directory)."""
    return f"sqlite:///{(Path(directory) / DEFAULT_DB).resolve()}"


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other storages)."""
    prefix = "sqlite:///"
    return Path(url[len(prefix):]) if url.startswith(prefix) and url != "sqlite:///:memory:" else None


def _with_password(url: str, password: str) -> str:
    from urllib.parse import quote

    m = re.match(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:@/]*)@", url)
    if m is None:
        raise StorageError(f"storage url {mask_url(url)} has no user (user@host) to give the password "
                           "of storage.password_env to: write it as scheme://user@host/db")
    return f"{m['scheme']}{m['user']}:{quote(password, safe='')}@{url[m.end():]}"


def resolve(campaign: Campaign, directory: Path, *, environ: Mapping[str, str] | None = None) -> StorageLocation:
    """Where the campaign's study lives, with its password (see the module docstring)."""
    env = os.environ if environ is None else environ
    whole = env.get(ENV_URL, "").strip()
    if whole:
        if "://" not in whole:
            raise StorageError(f"${ENV_URL} {mask_url(whole)!r} is not a storage URL: give e.g. "
                               "postgresql+psycopg://user:password@host/db, or unset it")
        return StorageLocation(whole, source=f"${ENV_URL}")
    if campaign.storage is None:
        return StorageLocation(default_url(directory), source="default")
    var = getattr(campaign, "storage_password_env", None)
    if var:
        password = env.get(var)
        if password is None:
            raise StorageError(f"storage.password_env: environment variable ${var} is not set: export it "
                               f"with the password of {mask_url(campaign.storage)}")
        return StorageLocation(_with_password(campaign.storage, password))
    return StorageLocation(campaign.storage)


def public_campaign(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The campaign as given (``campaign.raw``), JSON-ready, with the storage URL masked:
    what the driver stores as the study's ``campaign`` attribute."""
    import json

    out = json.loads(json.dumps(dict(raw), default=str))
    st = out.get("storage")
    if isinstance(st, str):
        out["storage"] = mask_url(st)
    elif isinstance(st, dict) and isinstance(st.get("url"), str):
        out["storage"] = {**st, "url": mask_url(st["url"])}
    return out


# -- opening -----------------------------------------------------------------------------------
def _fix_for(url: str, exc: BaseException) -> str:
    text = str(exc).lower()
    if isinstance(exc, ImportError) or "no module named" in text or "can't load plugin" in text:
        if url.startswith("postgresql"):
            return f"{POSTGRES_EXTRA} installs psycopg 3, the driver of postgresql+psycopg:// URLs"
        return "install the database driver the URL names (e.g. PyMySQL for mysql+pymysql://)"
    if "password authentication failed" in text or "access denied" in text:
        return f"check the user and password (storage.password_env or ${ENV_URL})"
    if "disk" in text and "full" in text or "no space" in text:
        return "free disk space where the study is stored, then resume with --resume"
    if "does not exist" in text and "database" in text:
        return "create the database (createdb NAME) or fix the URL's database name"
    if "malformed" in text or "file is not a database" in text:
        return ("the study file is damaged: restore it from a backup (`sqlite3 FILE .recover > dump.sql` "
                "can salvage what is readable)")
    if "unable to open database file" in text:
        return "check that the study's folder exists and is writable"
    if "connection refused" in text or "could not connect" in text or "timeout" in text \
            or "name or service not known" in text or "could not translate host" in text:
        return "check that the database server is running and reachable from this machine"
    return "check the storage URL and that the database is reachable"


def storage_error(url: str, exc: BaseException, *, doing: str = "open") -> StorageError:
    """A one-line ``StorageError`` for ``exc`` raised while using ``url`` (masked)."""
    cause: BaseException = exc
    while cause.__cause__ is not None and isinstance(cause, (optuna.exceptions.StorageInternalError, ImportError)):
        cause = cause.__cause__
    orig = getattr(cause, "orig", None) or cause  # SQLAlchemy's DBAPI error carries the driver's
    detail = " ".join(str(orig).split()) or type(orig).__name__
    detail = scrub(detail, url)[:300]
    return StorageError(f"cannot {doing} study storage {mask_url(url)}: {detail}; {_fix_for(url, cause)}")


def _storage_exceptions() -> tuple[type[BaseException], ...]:
    import sqlalchemy.exc

    return (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError, ImportError)


@contextlib.contextmanager
def guard(location: StorageLocation | str, *, doing: str = "write to") -> Iterator[None]:
    """Turn database errors raised inside the block into a one-line, masked ``StorageError``
    (e.g. around the driver's ask/tell: database gone, disk full)."""
    url = location.url if isinstance(location, StorageLocation) else location
    try:
        yield
    except _storage_exceptions() as exc:
        raise storage_error(url, exc, doing=doing) from None


def open_rdb(location: StorageLocation | str, *, wal: bool = False) -> optuna.storages.RDBStorage:
    """An Optuna ``RDBStorage`` on ``location``, its schema created if missing.

    SQLite waits for another process' write lock (a search and a reader share the file);
    ``wal=True`` (the driver) switches it to WAL journaling, see ``sqlite_wal``.
    """
    url = location.url if isinstance(location, StorageLocation) else location
    kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    if not url.startswith("sqlite"):
        kwargs["pool_pre_ping"] = True  # a connection the server dropped is replaced, not an error
    with guard(url, doing="open"):
        storage = _rdb_storage(url, kwargs)
        if wal and url.startswith("sqlite"):
            sqlite_wal(storage)
        return storage


def _rdb_storage(url: str, kwargs: dict[str, Any]) -> optuna.storages.RDBStorage:
    """``RDBStorage(url)``, tried again when its schema creation lost a race: Optuna checks for
    its tables, then creates them, so two processes opening a new database at the same moment
    (the driver, and a dashboard or a script polling the study) can both try to create them;
    the loser gets "table ... already exists", or fails to insert the schema's version row
    ("UNIQUE constraint failed: alembic_version..."). On the next try the tables are there."""
    import time

    for attempt in range(SCHEMA_RACE_TRIES):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as exc:
            lost_race = any(m in str(exc) for m in _SCHEMA_RACE_MESSAGES)
            if not lost_race or attempt == SCHEMA_RACE_TRIES - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
    raise AssertionError("unreachable")


def sqlite_wal(storage: optuna.storages.RDBStorage) -> None:
    """WAL journal, fsync at checkpoints only: a commit no longer waits for an fsync (see
    docs/campaigns.md for the measured cost). Committed trials still survive the driver being killed (kill -9); only an
    OS crash or power loss can drop the last commits."""
    import sqlalchemy

    def pragmas(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    sqlalchemy.event.listen(storage.engine, "connect", pragmas)
    storage.engine.dispose()  # connections opened by RDBStorage's own set-up get them too


def study_directions(campaign: Campaign) -> list[str]:
    return ["maximize"] * (len(campaign.objectives) if campaign.multi_objective else 1)


def open_study(campaign: Campaign, directory: Path, *, resume: bool,
               sampler: optuna.samplers.BaseSampler | None = None,
               pruner: optuna.pruners.BasePruner | None = None,
               location: StorageLocation | None = None,
               rdb: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """The campaign's study: created (``resume=False``, refused if it exists) or continued
    (``resume=True``, refused if it does not). ``rdb``: a storage the caller opened on
    ``location`` and keeps (the scheduler marks interrupted trials through it)."""
    loc = location or resolve(campaign, directory)
    storage = rdb if rdb is not None else open_rdb(loc, wal=True)
    with guard(loc, doing="open"):
        existing = {s.study_name for s in storage.get_all_studies()}
        if campaign.name in existing and not resume:
            raise StorageError(f"campaign {campaign.name!r} already has a study in {loc}: pass --resume to "
                               "continue it, or use another --dir / name")
        if campaign.name not in existing and resume:
            raise StorageError(f"nothing to resume: no study {campaign.name!r} in {loc}; run without --resume")
        return optuna.create_study(study_name=campaign.name, storage=storage, sampler=sampler, pruner=pruner,
                                   directions=study_directions(campaign), load_if_exists=True)


SQLITE_MAGIC = b"SQLite format 3\x00"   # the first 16 bytes of every SQLite database file


def require_study_file(location: StorageLocation | str, *, missing: str | None = None) -> None:
    """A SQLite storage's file exists and is a database, checked without opening it (Optuna would
    create a missing file, or write its schema into an empty one). ``missing``: the error when it
    does not exist (default: nothing to resume). Other storages are not checked here."""
    url = location.url if isinstance(location, StorageLocation) else location
    db = sqlite_file(url)
    if db is None:
        return
    if not db.is_file():
        raise StorageError(missing or f"nothing to resume: {db} does not exist; run without --resume")
    try:
        with open(db, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise StorageError(f"cannot read study file {db}: {exc.strerror or exc}; check its permissions") from None
    if not head:
        raise StorageError(f"study file {db} is empty (0 bytes), not a study: restore it from a backup, or "
                           "remove it and run `brmerge search` without --resume")
    if head != SQLITE_MAGIC:
        raise StorageError(f"study file {db} is not an SQLite database: restore it from a backup, or give the "
                           "campaign another --dir")


def open_campaign_storage(directory: Path) -> tuple[Campaign, optuna.storages.RDBStorage, int]:
    """A campaign directory's campaign, its study storage and the study's id, checked to exist
    (for the readers: status, report, dashboard, export).

    The SQLite file is checked first because Optuna would create a missing one, empty.
    """
    directory = Path(directory)
    cfg = directory / "campaign.yaml"
    if not cfg.is_file():
        raise StorageError(f"{directory} is not a campaign directory (no campaign.yaml): "
                           "give the --dir used with `brmerge search`")
    campaign = load_campaign(cfg)
    loc = resolve(campaign, directory)
    db = sqlite_file(loc.url)
    require_study_file(loc, missing=f"{directory} has no study yet ({db} is missing): "
                                    f"run `brmerge search {cfg} --dir {directory}` first")
    storage = open_rdb(loc)
    with guard(loc, doing="read"):
        try:
            study_id = storage.get_study_id_from_name(campaign.name)
        except KeyError:
            raise StorageError(f"no study named {campaign.name!r} in {loc}: the campaign's name changed "
                               "since the search, or it never ran; run `brmerge search` first") from None
    return campaign, storage, study_id


def load_campaign_study(directory: Path) -> tuple[Campaign, optuna.Study]:
    """A campaign directory's campaign and study, for the readers (status, report, export)."""
    campaign, storage, _ = open_campaign_storage(directory)
    with guard(resolve(campaign, directory), doing="read"):
        return campaign, optuna.load_study(study_name=campaign.name, storage=storage)


def load_study(directory: Path) -> optuna.Study:
    """The study of a campaign directory (its campaign.yaml names the storage)."""
    return load_campaign_study(directory)[1]
