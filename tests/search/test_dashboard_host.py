"""The dashboard answers only requests for a name it is served under (DNS rebinding).

A page on evil.example can rebind its name to 127.0.0.1 and make the browser send requests
to the dashboard's port, with ``Host: evil.example:PORT``. These tests send such requests over
real HTTP on loopback, to the app in a thread and to ``brmerge dashboard --allow-edits``.
"""

from __future__ import annotations

import http.client
import json
import threading

import optuna
import pytest
import yaml

from search.dashboard import HostCheck, allowed_names, host_name, make_app, make_server
from tests.search.test_dashboard import _free_port, _serve, _stop


@pytest.fixture
def campaign_dir(tmp_path):
    directory = tmp_path / "camp"
    directory.mkdir()
    (directory / "campaign.yaml").write_text(yaml.safe_dump(
        {"name": "dash", "base_model": "org/base", "models": ["org/a", "org/b"], "budget": {"trials": 3}}))
    study = optuna.create_study(study_name="dash", storage=f"sqlite:///{directory / 'study.db'}",
                                direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    return directory


def _send(port: int, method: str, path: str, host: str | None, body: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        if body is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
def served(campaign_dir):
    """The read-only app on 127.0.0.1 in a thread, allowing dash.example.org too."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{campaign_dir / 'study.db'}")
    app = make_app(storage, host="127.0.0.1", allowed_hosts=["dash.example.org"])
    server = make_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_foreign_host_is_refused_and_served_names_answer(served):
    port = served
    for host in ("evil.example", f"evil.example:{port}", f"localhost.evil.example:{port}", ""):
        status, body = _send(port, "GET", "/api/studies", host)
        assert status == 403, host
        assert b"--allowed-host" in body and b"study_summaries" not in body
    status, _ = _send(port, "GET", "/api/studies", None)   # no Host at all: not a browser's request
    assert status == 403
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}",
                 "localhost:9000",                      # an SSH tunnel's own port
                 f"10.1.2.3:{port}",                    # an address: no name to rebind
                 f"dash.example.org:{port}", "dash.example.org"):   # --allowed-host
        status, body = _send(port, "GET", "/api/studies", host)
        assert status == 200, host
        assert json.loads(body)["study_summaries"][0]["study_name"] == "dash"


def test_host_check_runs_before_the_read_only_layer(served):
    status, body = _send(served, "POST", "/api/studies", "evil.example", b'{"study_name": "x"}')
    assert status == 403 and b"--allowed-host" in body


def test_allow_edits_post_with_foreign_host_is_refused(campaign_dir):
    """The attack of the report: with --allow-edits, a rebinding page renamed the study."""
    db = f"sqlite:///{campaign_dir / 'study.db'}"
    study_id = optuna.storages.RDBStorage(db).get_study_id_from_name("dash")
    port = _free_port()
    proc = _serve(campaign_dir, port, "--allow-edits")
    try:
        rename = f"/api/studies/{study_id}/rename"
        status, body = _send(port, "POST", rename, f"evil.example:{port}", b'{"study_name": "pwned"}')
        assert status == 403 and b"--allowed-host" in body
        status, _ = _send(port, "DELETE", f"/api/studies/{study_id}", f"evil.example:{port}", b"{}")
        assert status == 403
        assert [s.study_name for s in optuna.get_all_study_summaries(db)] == ["dash"]
        # the same request for the served name goes through: the check is on Host alone
        status, _ = _send(port, "POST", rename, f"127.0.0.1:{port}", b'{"study_name": "renamed"}')
        assert status in (200, 201)
    finally:
        _stop(proc)
    assert [s.study_name for s in optuna.get_all_study_summaries(db)] == ["renamed"]


def test_allowed_host_option_reaches_the_app(campaign_dir):
    port = _free_port()
    proc = _serve(campaign_dir, port, "--allowed-host", "dash.example.org", "--allowed-host", "proxy.lan")
    try:
        assert _send(port, "GET", "/api/studies", f"proxy.lan:{port}")[0] == 200
        assert _send(port, "GET", "/api/studies", "dash.example.org")[0] == 200
        assert _send(port, "GET", "/api/studies", f"other.lan:{port}")[0] == 403
    finally:
        _stop(proc)


def test_names():
    assert host_name("[::1]:8080") == "::1" and host_name("::1") == "::1"
    assert host_name("Example.ORG:80") == "example.org" and host_name("example.org") == "example.org"
    names = allowed_names("127.0.0.1", ["a.lan:8080"])
    assert {"localhost", "127.0.0.1", "::1", "a.lan"} <= names and "evil.example" not in names
    assert "myhost.lan" in allowed_names("myhost.lan")
    check = HostCheck(lambda e, s: [b""], names)
    assert check.allows("a.lan:1") and check.allows("192.168.0.7:8080") and check.allows("[fe80::1]:80")
    assert not check.allows("a.lan.evil.example") and not check.allows(None)
