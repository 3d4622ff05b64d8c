"""Several nodes, simulated on one machine (``ray.cluster_utils.Cluster``, every node on
127.0.0.1): the real driver spreads its workers over both nodes; a node removed mid-trial
has its trial run again on the other node, by a replacement worker placed there; nothing is
lost and the budget is met exactly.

The cluster and the driver run in a subprocess: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER
when first imported, and without it Ray 2.60 rewrites 127.0.0.1 into the host's address
(the nodes would listen on every interface, and a driver could not join them by 127.0.0.1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import psutil
import pytest
import yaml

from search import trials as T
from search.storage import load_study
from search.trials import finished_trials

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray")]
REPO = Path(__file__).resolve().parents[2]
BUDGET = 6

# The cluster (head: 2 CPUs, room for a replacement; other node: 1 CPU) and the driver; a
# thread removes the other node as soon as one of its workers starts a stage.
SCRIPT = """
import json, os, sys, threading, time
from pathlib import Path
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"   # before ray: every node on 127.0.0.1
import ray
from ray.cluster_utils import Cluster
from search.campaign import load_campaign
from search.driver import run_campaign
from tests.search.workers import NodeRecordingWorker

cfg, camp, log = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
def records():
    return sorted((json.loads(p.read_text()) for p in log.glob("*.json")), key=lambda r: r["time"])

cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False})
out = {}
stop = threading.Event()
try:
    other = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    out.update(head=cluster.head_node.node_id, other=other.node_id)
    def remove_mid_trial():
        while not stop.is_set():
            started = [r for r in records() if r["phase"] == "start" and r["node"] == out["other"]]
            if started:
                cluster.remove_node(other, allow_graceful=False)
                out.update(removed_at=time.time(), removed=started[0])
                return
            time.sleep(0.1)
    remover = threading.Thread(target=remove_mid_trial, daemon=True)
    remover.start()
    text = cfg.read_text().replace("CLUSTER_ADDRESS", cluster.address)
    cfg.write_text(text)
    try:
        run_campaign(load_campaign(cfg), camp, progress=False, worker_factory=NodeRecordingWorker)
    finally:
        stop.set()
        remover.join(timeout=60)
        ray.shutdown()
finally:
    cluster.shutdown()
print(json.dumps(out), flush=True)
"""


def _write_campaign(path: Path, zoo: dict[str, Path]) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "cluster", "base_model": str(zoo["base"]), "models": [str(zoo["ft_a"]), str(zoo["ft_b"])],
        "method": "ties", "sampler": "random",
        "search": {"granularity": "global", "params": {"weight": [0.0, 1.0], "density": [0.2, 1.0]}},
        "objectives": {"legal": 1.0, "health": 1.0},
        "eval": {"suite": "sample", "limit": 4, "stage1": None},
        "budget": {"trials": BUDGET}, "workers": {"count": 2}, "seed": 3,
        "ray": {"address": "CLUSTER_ADDRESS"},
    }))
    return path


def _kill_session(sid: int) -> None:
    """Every process left in the script's session (its nodes, their workers and agents)."""
    members = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and os.getsid(p.pid) == sid:
                members.append(p)
                p.send_signal(signal.SIGKILL)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    psutil.wait_procs(members, timeout=10)


def test_workers_spread_over_two_nodes_and_a_removed_node_s_trial_runs_again_on_the_other(tiny_zoo, tmp_path):
    log = tmp_path / "stages"
    log.mkdir()
    cfg = _write_campaign(tmp_path / "c.yaml", tiny_zoo)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO),
               BRMERGE_TEST_NODE_LOG=str(log), BRMERGE_TEST_STAGE_SLEEP="1.5")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(cfg), str(tmp_path / "camp"), str(log)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail("the campaign on two nodes did not finish in 240 s:\n" + err[-3000:])
    finally:
        _kill_session(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    info = json.loads(out.strip().splitlines()[-1])
    assert "removed" in info, "the other node never ran a stage"

    records = sorted((json.loads(p.read_text()) for p in log.glob("*.json")), key=lambda r: r["time"])
    starts = [r for r in records if r["phase"] == "start"]
    # spread: both nodes ran workers; the one removed was mid-trial (started, never ended)
    assert {r["node"] for r in starts} == {info["head"], info["other"]}
    killed = info["removed"]
    assert not [r for r in records if r["phase"] == "end" and r["pid"] == killed["pid"]]
    # after the removal everything ran on the head, the removed worker's slot by a new process
    after = [r for r in starts if r["time"] > info["removed_at"]]
    assert after and {r["node"] for r in after} == {info["head"]}
    replacement = [r for r in after if r["worker"] == killed["worker"]]
    assert replacement and all(r["pid"] != killed["pid"] for r in replacement)
    # nothing lost, the budget exact: the interrupted trial ran again (attempt 2), counted once
    study = load_study(tmp_path / "camp")
    done = finished_trials(study)
    assert len(done) == BUDGET
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in done)
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in study.trials)
    assert [t for t in done if t.user_attrs.get(T.A_ATTEMPTS) == 2]
    assert "died" in (tmp_path / "camp" / "campaign.log").read_text()
