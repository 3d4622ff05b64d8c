"""``brmerge dashboard``: a real server on loopback, read-only by default, no credentials served,
a warning when it listens beyond loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml

from search.dashboard import exposure_warning

REPO = Path(__file__).resolve().parents[2]
SECRET = "hunter2-dash"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def campaign_dir(tmp_path) -> Path:
    """A campaign directory whose study holds a campaign attribute with a password in its
    storage URL, as drivers before masking wrote it."""
    directory = tmp_path / "camp"
    directory.mkdir()
    cfg = {"name": "dash", "base_model": "org/base", "models": ["org/a", "org/b"], "budget": {"trials": 3}}
    (directory / "campaign.yaml").write_text(yaml.safe_dump(cfg))
    study = optuna.create_study(study_name="dash", storage=f"sqlite:///{directory / 'study.db'}",
                                direction="maximize")
    study.set_user_attr("campaign", {**cfg, "storage": f"postgresql+psycopg://bob:{SECRET}@db/brm"})
    study.enqueue_trial({"x": 0.5})
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    return directory


def _serve(directory: Path, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "search", "dashboard", str(directory), "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if _request(f"http://127.0.0.1:{port}/api/meta")[0] == 200:
                return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"dashboard did not answer within 60 s: {proc.communicate()[1][-2000:]}")


def _stop(proc: subprocess.Popen) -> tuple[str, str]:
    proc.terminate()
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def test_read_only_by_default_and_no_password_served(campaign_dir):
    port = _free_port()
    proc = _serve(campaign_dir, port)
    try:
        base = f"http://127.0.0.1:{port}"
        status, body = _request(f"{base}/api/studies")
        assert status == 200 and SECRET.encode() not in body
        (summary,) = json.loads(body)["study_summaries"]
        assert summary["study_name"] == "dash"
        study_id = summary["study_id"]
        assert SECRET.encode() not in _request(f"{base}/api/studies/{study_id}")[1]

        status, body = _request(f"{base}/api/studies/{study_id}", "DELETE", b"{}")
        assert status == 403 and b"--allow-edits" in body
        status, _ = _request(f"{base}/api/studies/{study_id}/rename", "POST", b'{"study_name": "x"}')
        assert status == 403
        status, _ = _request(f"{base}/api/studies", "POST", b'{"study_name": "new", "directions": ["maximize"]}')
        assert status == 403
    finally:
        out, _ = _stop(proc)
    assert "read-only" in out
    names = [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{campaign_dir / 'study.db'}")]
    assert names == ["dash"]
    study = optuna.load_study(study_name="dash", storage=f"sqlite:///{campaign_dir / 'study.db'}")
    assert len(study.trials) == 2 and study.user_attrs["campaign"]["storage"].endswith(f"{SECRET}@db/brm")


def test_allow_edits_lets_the_dashboard_delete(campaign_dir):
    port = _free_port()
    proc = _serve(campaign_dir, port, "--allow-edits")
    try:
        base = f"http://127.0.0.1:{port}"
        (summary,) = json.loads(_request(f"{base}/api/studies")[1])["study_summaries"]
        status, _ = _request(f"{base}/api/studies/{summary['study_id']}", "DELETE", b"{}")
        assert status == 204
    finally:
        _stop(proc)
    assert optuna.get_all_study_summaries(f"sqlite:///{campaign_dir / 'study.db'}") == []


def test_non_loopback_host_warns_that_there_is_no_authentication():
    assert exposure_warning("127.0.0.1", 8080, allow_edits=False) is None
    assert exposure_warning("::1", 8080, allow_edits=True) is None
    warning = exposure_warning("0.0.0.0", 8080, allow_edits=False)
    assert warning is not None and "no authentication" in warning and "0.0.0.0:8080" in warning
    assert "--allow-edits" in exposure_warning("10.0.0.5", 80, allow_edits=True)


def test_cli_prints_the_warning_for_a_non_loopback_host(campaign_dir):
    port = _free_port()
    cmd = [sys.executable, "-m", "search", "dashboard", str(campaign_dir), "--port", str(port),
           "--host", "0.0.0.0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "no authentication" in line
    finally:
        _stop(proc)


def test_port_in_use_is_one_line_from_the_command_line(campaign_dir, capsys):
    from search.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", str(campaign_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot serve on 127.0.0.1:{port}" in err and "pass another --port" in err
