"""search.storage: URLs, credentials from the environment, masking, opening errors."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from merge_core.errors import BrmergeError
from search import public_storage as P
from search import storage as S
from search.campaign import CampaignError, parse_campaign

BASE = {"name": "st", "base_model": "org/base", "models": ["org/a", "org/b"], "budget": {"trials": 4}}


def campaign(**over):
    return parse_campaign({**BASE, **over}, source="test")


def write_dir(directory: Path, **over) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "campaign.yaml").write_text(yaml.safe_dump({**BASE, **over}))
    return directory


@pytest.mark.parametrize("url, masked", [
    ("postgresql+psycopg://bob:s3cr%40t@db:5432/brm", "postgresql+psycopg://bob:***@db:5432/brm"),
    ("mysql://root:pw@localhost/x?charset=utf8", "mysql://root:***@localhost/x?charset=utf8"),
    ("postgresql://bob@db/brm", "postgresql://bob@db/brm"),
    ("postgresql://db/brm?user=bob&password=hunter2", "postgresql://db/brm?user=bob&password=***"),
    ("sqlite:////tmp/study.db", "sqlite:////tmp/study.db"),
])
def test_mask_url(url, masked):
    assert S.mask_url(url) == masked


def test_password_from_the_environment_variable_the_campaign_names(tmp_path):
    c = campaign(storage={"url": "postgresql+psycopg://bob@db/brm", "password_env": "PGPASS_T"})
    loc = S.resolve(c, tmp_path, environ={"PGPASS_T": "p@ss/word"})
    assert loc.url == "postgresql+psycopg://bob:p%40ss%2Fword@db/brm"
    assert "p%40ss" not in str(loc) and "p%40ss" not in repr(loc) and loc.public.count("***") == 1
    with pytest.raises(S.StorageError, match=r"\$PGPASS_T is not set"):
        S.resolve(c, tmp_path, environ={})


def test_whole_url_from_brmerge_storage_url_wins(tmp_path):
    c = campaign()
    assert S.resolve(c, tmp_path, environ={}).url == f"sqlite:///{(tmp_path / 'study.db').resolve()}"
    loc = S.resolve(c, tmp_path, environ={"BRMERGE_STORAGE_URL": "postgresql+psycopg://u:pw@h/d"})
    assert loc.url == "postgresql+psycopg://u:pw@h/d" and loc.source == "$BRMERGE_STORAGE_URL"
    assert str(loc) == "postgresql+psycopg://u:***@h/d"


def test_campaign_storage_mapping_is_validated():
    with pytest.raises(CampaignError) as err:
        campaign(storage={"url": "postgresql://u:pw@h/d", "password_env": "X", "pasword": 1})
    assert "unknown keys ['pasword']" in str(err.value)
    assert "remove the password from the url" in str(err.value)
    with pytest.raises(CampaignError, match="name of an environment variable"):
        campaign(storage={"url": "postgresql://u@h/d", "password_env": "not a name"})
    c = campaign(storage={"url": "postgresql://u@h/d", "password_env": "X"})
    assert (c.storage, c.storage_password_env) == ("postgresql://u@h/d", "X")


def test_public_campaign_masks_the_storage_url():
    raw = {**BASE, "storage": "postgresql://u:hunter2@h/d"}
    assert S.public_campaign(raw)["storage"] == "postgresql://u:***@h/d"
    raw = {**BASE, "storage": {"url": "postgresql://u:hunter2@h/d", "password_env": None}}
    assert "hunter2" not in str(S.public_campaign(raw)) and raw["storage"]["url"].endswith("@h/d")


def test_opening_a_storage_that_cannot_open_is_one_masked_line(tmp_path):
    url = f"sqlite:///{tmp_path}/no/such/dir/study.db"
    with pytest.raises(S.StorageError) as err:
        S.open_rdb(url)
    msg = str(err.value)
    assert isinstance(err.value, BrmergeError) and "\n" not in msg
    assert msg.startswith(f"cannot open study storage {url}") and "writable" in msg


def test_missing_driver_names_the_extra(tmp_path):
    with pytest.raises(S.StorageError) as err:
        S.open_rdb("postgresql+pg8000nope://u:hunter2@127.0.0.1:1/d")
    assert "hunter2" not in str(err.value) and "u:***@" in str(err.value)


def test_open_study_creates_then_resumes_and_refuses_the_wrong_one(tmp_path):
    c = campaign()
    with pytest.raises(S.StorageError, match="nothing to resume"):
        S.open_study(c, tmp_path, resume=True)
    study = S.open_study(c, tmp_path, resume=False)
    assert study.study_name == "st" and (tmp_path / "study.db").is_file()
    with pytest.raises(S.StorageError, match="pass --resume"):
        S.open_study(c, tmp_path, resume=False)
    assert S.open_study(c, tmp_path, resume=True).study_name == "st"
    assert S.study_directions(campaign(sampler="nsga2")) == ["maximize"] * 3


def test_status_error_masks_the_password(tmp_path, capsys):
    # a reachable database without the study: the message names the storage, masked
    from search.cli import main

    db = tmp_path / "other.db"
    optuna.create_study(study_name="x", storage=f"sqlite:///{db}")
    directory = write_dir(tmp_path / "camp", storage=f"sqlite:///{db}")
    assert main(["status", str(directory)]) == 2
    assert "no study named 'st'" in capsys.readouterr().err

    directory = write_dir(tmp_path / "pg", storage="postgresql+psycopg://bob:hunter2@127.0.0.1:1/brm")
    assert main(["status", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hunter2" not in err and "bob:***@127.0.0.1:1/brm" in err


def test_public_storage_refuses_writes_and_masks_reads():
    inner = optuna.storages.InMemoryStorage()
    study = optuna.create_study(study_name="s", storage=inner)
    study.set_user_attr("campaign", {"storage": "postgresql://u:hunter2@h/d"})
    ro = P.PublicStorage(inner)
    assert "hunter2" not in repr([s.user_attrs for s in ro.get_all_studies()])
    assert ro.get_study_user_attrs(inner.get_study_id_from_name("s"))["campaign"]["storage"] == "postgresql://u:***@h/d"
    with pytest.raises(P.ReadOnlyStorageError, match="--allow-edits"):
        ro.delete_study(inner.get_study_id_from_name("s"))
    with pytest.raises(P.ReadOnlyStorageError):
        optuna.load_study(study_name="s", storage=ro).ask()
    assert [s.study_name for s in inner.get_all_studies()] == ["s"]
    P.PublicStorage(inner, writable=True).delete_study(inner.get_study_id_from_name("s"))
    assert inner.get_all_studies() == []


def test_disk_full_while_writing_is_one_line_with_the_fix(tmp_path):
    import sqlite3

    db = tmp_path / "full.db"
    url = f"sqlite:///{db}"
    study = optuna.create_study(study_name="s", storage=S.open_rdb(url))
    pages = sqlite3.connect(db).execute("PRAGMA page_count").fetchone()[0]

    def small_disk() -> sqlite3.Connection:  # SQLite's own "database or disk is full" (SQLITE_FULL)
        conn = sqlite3.connect(db, check_same_thread=False)
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        return conn

    full = optuna.load_study(study_name="s", storage=optuna.storages.RDBStorage(
        url, engine_kwargs={"creator": small_disk}))
    with pytest.raises(S.StorageError) as err, S.guard(url):
        for i in range(1000):
            full.set_user_attr(f"k{i}", "x" * 4000)
    msg = str(err.value)
    assert msg.startswith(f"cannot write to study storage {url}: ") and "\n" not in msg
    assert "full" in msg and "free disk space" in msg
    assert len(study.user_attrs) < 1000


def test_opening_a_new_database_survives_another_process_creating_its_tables(tmp_path, monkeypatch):
    """Optuna checks for its tables, then creates them: a second process opening the new
    database at that moment gets "table studies already exists" (seen in CI: a test polling the
    study while the driver created it). open_rdb tries again; the tables are there then."""
    import sqlalchemy.exc

    real = optuna.storages.RDBStorage
    calls = []

    def racing(url, **kwargs):
        calls.append(url)
        if len(calls) == 1:
            real(url, **kwargs)     # "the other process" creates the schema first...
            raise sqlalchemy.exc.OperationalError("CREATE TABLE studies", {}, Exception("table studies already exists"))
        return real(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = S.open_rdb(url)
    monkeypatch.undo()
    assert len(calls) == 2 and optuna.create_study(study_name="s", storage=storage).study_name == "s"

    # any other failure is not retried: one line naming the storage, as before
    def broken(url, **kwargs):
        calls.append(url)
        raise sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("disk I/O error"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    calls.clear()
    with pytest.raises(BrmergeError, match="disk I/O error") as err:
        S.open_rdb(url)
    assert len(calls) == 1 and "\n" not in str(err.value)


def test_two_processes_opening_one_new_database_at_once_both_succeed(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from search import storage as S; "
            "S.open_rdb(sys.argv[1]); print('ok')")
    repo = Path(__file__).resolve().parents[2]
    for k in range(3):
        url = f"sqlite:///{tmp_path / f'race{k}.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", code, url], cwd=repo, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0 and out.strip() == "ok", err[-1000:]
