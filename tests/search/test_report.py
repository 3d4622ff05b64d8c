"""``brmerge report`` and ``brmerge dashboard`` on studies built synthetically, as the driver
would have written them (same parameter names and trial attributes), without models or Ray."""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from matplotlib.image import imread

from evals.stats import encode_bits
from search import trials as T
from search.storage import StorageError, study_directions
from search.campaign import load_campaign
from search.commands import dashboard as dashboard_cmd
from search.commands import report as report_cmd
from search.genome import GenomeSpace
from search.figures import coefficient_grid
from search.report import write_report

REPO = Path(__file__).resolve().parents[2]
LAYERS = 4   # few layers and trials keep the SQLite writes and the drawing quick
DOMAINS = ("legal", "health", "enem")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_campaign(directory: Path, *, sampler: str = "cmaes", split: bool = False,
                   granularity: str = "layer", name: str = "demo-ptbr") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    cfg = {"name": name, "base_model": "org/base-7b", "models": ["org/legal-ft", "org/health-ft"],
           "method": "ties", "sampler": sampler,
           "search": {"granularity": granularity, "params": {"weight": [0.0, 1.0], "density": [0.1, 1.0]},
                      "split_attn_mlp": split},
           "objectives": {d: 1.0 for d in DOMAINS}, "budget": {"trials": 40}}
    path = directory / "campaign.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def _domains(rng: np.random.Generator) -> dict[str, dict[str, float]]:
    # accuracies are whole items out of 50, as an evaluation gives them
    return {d: {"acc": int(rng.integers(15, 36)) / 50, "gold_prob": float(rng.uniform(0.2, 0.6)), "n": 50}
            for d in DOMAINS}


def _items(rng: np.random.Generator, domains: dict) -> dict[str, str]:
    """Per-item correctness consistent with each domain's accuracy, in a random order."""
    out = {}
    for d, v in domains.items():
        right = round(v["acc"] * v["n"])
        bits = [i < right for i in range(v["n"])]
        rng.shuffle(bits)
        out[d] = encode_bits(bits)
    return out


def _attrs(rng: np.random.Generator, number: int, **extra) -> dict:
    start = 1_700_000_000.0 + 30 * number
    return {T.A_DIGEST: f"d{number:04d}", T.A_RECIPE: "merge_method: ties\n", T.A_WORKER: number % 2,
            T.A_MATERIALIZE: 0.5, T.A_EVAL: 12.5, T.A_START: start, T.A_END: start + 13.0, **extra}


def build_study(directory: Path, *, sampler: str = "cmaes", split: bool = False, n_search: int = 8,
                pruned: int = 2, failed: int = 1, granularity: str = "layer") -> optuna.Study:
    """A finished-looking campaign: baselines, searched, pruned, failed and interrupted trials."""
    campaign = load_campaign(write_campaign(directory, sampler=sampler, split=split, granularity=granularity))
    space = GenomeSpace(campaign, LAYERS)
    multi = campaign.multi_objective
    study = optuna.create_study(study_name=campaign.name, storage=campaign.storage_url(directory),
                                directions=study_directions(campaign))
    study.set_user_attr("campaign", json.loads(json.dumps(campaign.raw)))
    study.set_user_attr("num_layers", LAYERS)
    study.set_user_attr("objective_names", list(campaign.objectives) if multi else ["score"])
    dists = space.distributions()
    rng = np.random.default_rng(0)

    def complete(params: dict, **extra) -> None:
        domains = _domains(rng)
        score = float(np.mean([v["acc"] for v in domains.values()]))
        values = [domains[d]["acc"] for d in DOMAINS] if multi else [score]
        attrs = _attrs(rng, len(study.trials), **{T.A_DOMAINS: domains, T.A_SCORE: score,
                                                  T.A_ITEMS: _items(rng, domains),
                                                  T.A_STAGE1: score + 0.01, **extra})
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, values=values,
                                                  user_attrs=attrs))

    def random_params() -> dict:
        return {n: float(rng.uniform(*space.bounds(n))) for n in space.param_names()}

    for name, params in space.baselines():
        complete(params, **{T.A_BASELINE: name})
    for i in range(n_search):
        complete(random_params())
        if i < pruned:
            study.add_trial(optuna.trial.create_trial(
                params=random_params(), distributions=dists, state=optuna.trial.TrialState.PRUNED,
                intermediate_values={0: 0.2}, user_attrs=_attrs(rng, len(study.trials), **{T.A_STAGE1: 0.2})))
        if i < failed:
            study.add_trial(optuna.trial.create_trial(
                params=random_params(), distributions=dists, state=optuna.trial.TrialState.FAIL,
                user_attrs={T.A_ERROR: "non-finite weights in model.layers.3.mlp.up_proj.weight"}))
    # one interrupted trial: a FAIL the budget does not count (it was re-run)
    study.add_trial(optuna.trial.create_trial(params=random_params(), distributions=dists,
                                              state=optuna.trial.TrialState.FAIL,
                                              user_attrs={T.A_INTERRUPTED: True}))
    return study


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[optuna.Study, Path]:
    """One single-objective campaign, shared read-only by the tests below (building it is the slow part)."""
    directory = tmp_path_factory.mktemp("single") / "camp"
    return build_study(directory, n_search=6), directory


def test_report_single_objective(single):
    study, directory = single
    report = write_report(directory)
    out = directory / "report"
    assert report.html == out / "report.html"
    names = {p.name for p in report.images}
    assert names == {"history.png", "heatmap.png", "domains.png"}  # no Pareto front: one objective
    for png in report.images:
        assert_png(png)
    page = report.html.read_text(encoding="utf-8")
    # self-contained: every figure embedded, byte for byte, and nothing fetched from elsewhere
    assert sorted(embedded_pngs(page)) == sorted(p.read_bytes() for p in report.images)
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "single-objective study" in page
    # the table holds the best trial with its score and per-domain accuracy, and every baseline
    best = max((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.user_attrs[T.A_SCORE])
    kind = f"baseline {best.user_attrs[T.A_BASELINE]}" if T.A_BASELINE in best.user_attrs else "search"
    score = best.user_attrs[T.A_SCORE]
    assert f'<td>#{best.number}</td><td>{kind}</td><td class="num">{score:.4f} [' in page   # with its interval
    # dev comparisons carry no verdict; verdicts come from held-out items; pruning is accounted for
    assert "selected on these items, no verdict" in page and "Verdicts on held-out test items" in page
    assert "Stage-1 pruning" in page and "looks at the test split" in page
    for word in (">better<", "not distinguishable", "really better"):
        assert word not in page
    assert f"{best.user_attrs[T.A_DOMAINS]['legal']['acc']:.3f}" in page
    for name in ("baseline uniform", "baseline model:org/legal-ft", "baseline model:org/health-ft"):
        assert name in page
    # the facts count what the budget counts: the interrupted trial is not a failure
    assert "<th>trials done</th><td>12 of 40</td>" in page  # 3 baselines, 6 searched, 2 pruned, 1 failed
    assert "<th>pruned</th><td>2</td>" in page and "<th>failed</th><td>1</td>" in page
    assert "<th>method</th><td>ties</td>" in page and "<th>sampler</th><td>cmaes</td>" in page
    assert "non-finite weights in model.layers.3.mlp.up_proj.weight" in page


def test_report_multi_objective_with_attn_mlp_split(tmp_path):
    build_study(tmp_path / "camp", sampler="nsga2", split=True, n_search=5, pruned=0, failed=0)
    report = write_report(tmp_path / "camp", out=tmp_path / "elsewhere")
    assert {p.name for p in report.images} == {"history.png", "heatmap.png", "pareto.png", "domains.png"}
    assert all(p.parent == tmp_path / "elsewhere" for p in report.paths)
    for png in report.images:
        assert_png(png)
    page = report.html.read_text(encoding="utf-8")
    assert len(embedded_pngs(page)) == 4
    assert "Pareto" in page and "multi-objective: legal, health, enem" in page


def test_heatmap_rows_expand_blocks_per_layer_like_the_genome(tmp_path):
    campaign = load_campaign(write_campaign(tmp_path, granularity="block:4", split=True))
    space = GenomeSpace(campaign, 6)
    params = {n: float(i) for i, n in enumerate(space.param_names())}
    grid = coefficient_grid(space, params)
    assert list(grid) == ["weight", "density"]
    labels = [label for label, _ in grid["weight"]]
    assert labels == ["legal-ft · attn", "legal-ft · mlp", "health-ft · attn", "health-ft · mlp"]
    b0, b1 = params["m1.weight.mlp.B00"], params["m1.weight.mlp.B01"]
    assert grid["weight"][3][1] == [b0] * 4 + [b1] * 2  # layers 0-3 share block 0, layers 4-5 block 1


def test_report_empty_study_says_so(tmp_path, capsys):
    campaign = load_campaign(write_campaign(tmp_path / "camp"))
    optuna.create_study(study_name=campaign.name, storage=campaign.storage_url(tmp_path / "camp"))
    code = report_cmd.run(argparse.Namespace(dir=tmp_path / "camp", out=None, top=10))
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("no completed trial yet")
    assert printed[1:] == [str(tmp_path / "camp" / "report" / "report.html")]  # the paths written
    page = (tmp_path / "camp" / "report" / "report.html").read_text(encoding="utf-8")
    assert "No completed trial yet" in page and "data:image/png" not in page
    assert "<th>trials done</th><td>0 of 40</td>" in page


def test_report_errors_name_the_fix(tmp_path):
    with pytest.raises(StorageError, match="not a campaign directory"):
        write_report(tmp_path)
    write_campaign(tmp_path / "camp")
    with pytest.raises(StorageError, match="run `brmerge search"):
        write_report(tmp_path / "camp")
    assert not (tmp_path / "camp" / "study.db").exists()  # reporting never creates a study
    campaign = load_campaign(tmp_path / "camp" / "campaign.yaml")
    optuna.create_study(study_name="renamed", storage=campaign.storage_url(tmp_path / "camp"))
    with pytest.raises(ValueError, match="no study named 'demo-ptbr'"):
        write_report(tmp_path / "camp")


# -- dashboard ---------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def test_dashboard_serves_the_study_on_loopback(single):
    _, directory = single
    port = _free_port()
    code = ("import argparse, pathlib, sys; from search.commands import dashboard as d; "
            f"sys.exit(d.run(argparse.Namespace(dir=pathlib.Path({str(directory)!r}), "
            f"host='127.0.0.1', port={port})))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        first = proc.stdout.readline()
        assert first.strip() == f"optuna-dashboard: http://127.0.0.1:{port}"
        body, deadline = None, time.monotonic() + 30
        while body is None and time.monotonic() < deadline and proc.poll() is None:
            body = _get(f"http://127.0.0.1:{port}/api/studies")
            time.sleep(0.2) if body is None else None
        assert body is not None, "optuna-dashboard did not answer within 30 s"
        studies = json.loads(body)["study_summaries"]
        assert [s["study_name"] for s in studies] == ["demo-ptbr"]
        assert b"<html" in (_get(f"http://127.0.0.1:{port}/dashboard") or b"").lower()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_dashboard_refuses_a_directory_without_study(tmp_path):
    write_campaign(tmp_path / "camp")
    with pytest.raises(StorageError, match="no study yet"):
        dashboard_cmd.run(argparse.Namespace(dir=tmp_path / "camp", host="127.0.0.1", port=_free_port()))


def test_dashboard_port_in_use_names_the_fix(single):
    _, directory = single
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match="pass another --port"):
            dashboard_cmd.run(argparse.Namespace(dir=directory, host="127.0.0.1", port=port))


def test_dashboard_defaults_to_loopback():
    parser = argparse.ArgumentParser()
    dashboard_cmd.add_arguments(parser)
    args = parser.parse_args(["somewhere"])
    assert (args.host, args.port) == ("127.0.0.1", 8080)
