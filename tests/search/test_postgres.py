"""PostgreSQL as a study storage, against a real server that the tests start themselves.

A session fixture runs ``initdb`` and ``pg_ctl`` (as the ``postgres`` user when run as root)
on a free loopback port in a temporary folder, with password authentication over TCP, and
stops it at the end. Skipped, with the reason, only where the PostgreSQL server binaries are
absent (``.ci/run`` installs them).
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml

from search import storage as S
from search.campaign import parse_campaign

REPO = Path(__file__).resolve().parents[2]
SUPER_PASSWORD = "super-Secret-1"
ROLE, ROLE_PASSWORD = "brm", "p@ss:w/rd-Secret"  # characters that must be escaped in a URL


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Server:
    port: int
    data: Path

    def url(self, *, user: str = ROLE, password: str | None = None, db: str = ROLE) -> str:
        from urllib.parse import quote

        auth = f"{user}:{quote(password, safe='')}" if password is not None else user
        return f"postgresql+psycopg://{auth}@127.0.0.1:{self.port}/{db}"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql "
                    "(.ci/run does)")
    psycopg = pytest.importorskip("psycopg", reason="psycopg 3 missing: pip install -e '.[postgres]'")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="brmerge-pg-"))
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    pwfile = root / "pw"
    pwfile.write_text(SUPER_PASSWORD)
    if as_user:
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    run = lambda cmd: subprocess.run(as_user + cmd, check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    try:
        run([initdb, "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}", "--auth-local=trust",
             "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"])
        run([pg_ctl, "-D", str(data), "-l", str(root / "log"), "-w", "-t", "60", "start", "-o",
             f"-p {port} -c listen_addresses=127.0.0.1 -k {root} -c fsync=off -c max_connections=100"])
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise AssertionError(f"could not start PostgreSQL: {exc.stderr}\n{log}") from None
    try:
        su = f"postgresql://postgres:{SUPER_PASSWORD}@127.0.0.1:{port}/postgres"
        with psycopg.connect(su, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}'")
            conn.execute(f"CREATE DATABASE {ROLE} OWNER {ROLE}")
        yield Server(port, data)
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def _fresh_db(server: Server, name: str) -> str:
    import psycopg

    su = f"postgresql://postgres:{SUPER_PASSWORD}@127.0.0.1:{server.port}/postgres"
    with psycopg.connect(su, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} OWNER {ROLE}")
    return name


def _status(directory: Path) -> int:
    """``brmerge status DIR`` as the command line runs it (errors: one line, status 2)."""
    from search.cli import _run
    from search.commands import status

    return _run(argparse.Namespace(command="status", _run=status.run, dir=directory, top=5, json=False))


BASE = {"name": "pg", "base_model": "org/base", "models": ["org/a", "org/b"], "budget": {"trials": 4}}


# -- (a) opening and creating a study through search.storage ------------------------------------
def test_study_on_a_password_protected_role_with_the_password_from_the_environment(pg_server, tmp_path, capsys):
    db = _fresh_db(pg_server, "open_a")
    cfg = {**BASE, "storage": {"url": pg_server.url(db=db), "password_env": "BRMERGE_TEST_PGPASS"}}
    campaign = parse_campaign(cfg, source="test")
    env = {"BRMERGE_TEST_PGPASS": ROLE_PASSWORD}
    loc = S.resolve(campaign, tmp_path, environ=env)
    study = S.open_study(campaign, tmp_path, resume=False, location=loc)
    study.set_user_attr("campaign", S.public_campaign(campaign.raw))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)

    # the stored campaign, the location and the messages show the URL masked
    stored = optuna.load_study(study_name="pg", storage=S.open_rdb(loc)).user_attrs["campaign"]
    assert stored["storage"]["url"] == pg_server.url(db=db)  # it had no password; stays so
    assert str(loc) == f"postgresql+psycopg://{ROLE}:***@127.0.0.1:{pg_server.port}/{db}"
    assert ROLE_PASSWORD not in repr(loc) and "p%40ss" not in str(loc)
    with pytest.raises(S.StorageError) as err:
        S.open_study(campaign, tmp_path, resume=False, location=loc)
    assert "pass --resume" in str(err.value) and "p%40ss" not in str(err.value) and ":***@" in str(err.value)
    assert len(S.open_study(campaign, tmp_path, resume=True, location=loc).trials) == 2

    # a campaign directory on that storage: status reads it (password from the environment)
    directory = tmp_path / "camp"
    directory.mkdir()
    (directory / "campaign.yaml").write_text(yaml.safe_dump(cfg))
    os.environ["BRMERGE_TEST_PGPASS"] = ROLE_PASSWORD
    try:
        assert _status(directory) == 0
        assert "progress: " in capsys.readouterr().out
    finally:
        del os.environ["BRMERGE_TEST_PGPASS"]


def test_a_password_in_the_url_is_masked_in_the_stored_campaign_and_in_status(pg_server, tmp_path, capsys):
    db = _fresh_db(pg_server, "open_b")
    url = pg_server.url(password=ROLE_PASSWORD, db=db)
    cfg = {**BASE, "storage": url}
    campaign = parse_campaign(cfg, source="test")
    study = S.open_study(campaign, tmp_path, resume=False)
    study.set_user_attr("campaign", S.public_campaign(campaign.raw))
    secret = url.split(":", 2)[2].split("@")[0]  # the password as the URL spells it
    assert secret not in repr(optuna.load_study(study_name="pg", storage=url).user_attrs)

    directory = tmp_path / "camp"
    directory.mkdir()
    (directory / "campaign.yaml").write_text(yaml.safe_dump({**cfg, "name": "renamed"}))
    assert _status(directory) == 2  # no study of that name: the message names the storage
    err = capsys.readouterr().err
    assert "no study named 'renamed'" in err and f"{ROLE}:***@127.0.0.1:{pg_server.port}/{db}" in err
    assert secret not in err and ROLE_PASSWORD not in err


@pytest.mark.parametrize("case", ["wrong password", "database gone", "server gone"])
def test_opening_errors_are_one_masked_line(pg_server, case):
    url = {"wrong password": pg_server.url(password="not-" + ROLE_PASSWORD),
           "database gone": pg_server.url(password=ROLE_PASSWORD, db="no_such_db"),
           "server gone": pg_server.url(password=ROLE_PASSWORD).replace(str(pg_server.port), str(_free_port()))}[case]
    with pytest.raises(S.StorageError) as err:
        S.open_rdb(url)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("cannot open study storage postgresql+psycopg://brm:***@")
    assert "Secret" not in msg
    fix = {"wrong password": "check the user and password", "database gone": "createdb",
           "server gone": "database server is running"}[case]
    assert fix in msg


def test_lease_in_postgres_refuses_a_second_driver(pg_server, tmp_path):
    from search import locks

    url = pg_server.url(password=ROLE_PASSWORD, db=_fresh_db(pg_server, "lease"))
    with locks.acquire(tmp_path / "a", location=url, study_name="pg", heartbeat_seconds=0):
        with pytest.raises(locks.LockError) as err:
            locks.acquire(tmp_path / "b", location=url, study_name="pg")
        assert "in use by a live driver" in str(err.value) and "Secret" not in str(err.value)
    with locks.acquire(tmp_path / "b", location=url, study_name="pg", heartbeat_seconds=0):
        pass


# -- (b) a real campaign on PostgreSQL: two workers, kill -9, --resume -------------------------
@pytest.mark.slow
def test_campaign_on_postgres_survives_kill9_and_resumes_to_the_exact_budget(pg_server, tiny_zoo, tmp_path):
    # the study's record names (search.trials)
    A_CACHED, A_DIGEST, A_INTERRUPTED, A_WORKER = "cached_from", "recipe_digest", "interrupted", "worker"
    DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)

    db = _fresh_db(pg_server, "e2e")
    url = pg_server.url(db=db)  # no password in the file: libpq reads $PGPASSWORD
    budget = 10   # room to catch the driver mid-trial after two finished ones, even on a loaded machine
    cfg = tmp_path / "campaign.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "pg-e2e", "base_model": str(tiny_zoo["base"]), "models": [str(tiny_zoo["ft_a"]), str(tiny_zoo["ft_b"])],
        "method": "ties", "sampler": "cmaes",
        "search": {"granularity": "block:2", "params": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}},
        "objectives": {"legal": 1.0, "health": 1.0},
        "eval": {"suite": "sample", "limit": 6, "stage1": None},
        "budget": {"trials": budget}, "workers": {"count": 2}, "seed": 3, "storage": url}))
    directory = tmp_path / "camp"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PGPASSWORD": ROLE_PASSWORD}
    cmd = [sys.executable, "-m", "search", "search", str(cfg), "--dir", str(directory), "--workers", "2", "--quiet"]
    reader = optuna.storages.RDBStorage(pg_server.url(password=ROLE_PASSWORD, db=db))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    completed_before: dict[int, tuple] = {}
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                study = optuna.load_study(study_name="pg-e2e", storage=reader)
            except KeyError:  # not created yet
                continue
            trials = study.get_trials(deepcopy=False)
            done = {t.number: (t.state.name, tuple(t.values or ())) for t in trials if t.state.is_finished()}
            running = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and len(t.params) == 8]
            if len(done) >= 2 and running:
                os.kill(proc.pid, signal.SIGKILL)  # the driver only, mid-trial
                completed_before = done
                break
        assert completed_before, f"the campaign never reached two finished trials: {proc.poll()} " \
                                 f"{proc.stderr.read()[-2000:] if proc.poll() is not None else ''}"
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the dead driver's local Ray processes
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=600, start_new_session=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ROLE_PASSWORD not in resumed.stdout + resumed.stderr

    study = optuna.load_study(study_name="pg-e2e", storage=reader)
    trials = study.get_trials(deepcopy=False)
    for number, (state, values) in completed_before.items():  # nothing finished was lost or changed
        assert (trials[number].state.name, tuple(trials[number].values or ())) == (state, values)
    counted = [t for t in trials if t.state in DONE and not t.user_attrs.get(A_INTERRUPTED)]
    assert len(counted) == budget  # the exact budget: interrupted trials not counted
    interrupted = [t for t in trials if t.user_attrs.get(A_INTERRUPTED)]
    assert interrupted and all(t.state == optuna.trial.TrialState.FAIL for t in interrupted)
    for t in interrupted:  # re-run with the same parameters
        if len(t.params) == 8:
            assert any(o.params == t.params and o.number > t.number and o.number in {c.number for c in counted}
                       for o in trials)
    workers = {t.user_attrs[A_WORKER] for t in counted if A_WORKER in t.user_attrs}
    assert len(workers) == 2  # both workers ran trials
    digests = [t.user_attrs[A_DIGEST] for t in trials
               if t.state == optuna.trial.TrialState.COMPLETE and A_CACHED not in t.user_attrs]
    assert len(digests) == len(set(digests))  # nothing evaluated twice
    reader.remove_session()
