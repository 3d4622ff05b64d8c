"""Attacks on a campaign (directory, resume, storage, inputs), each reproduced, each refused in
one line (exit 2) before it can do harm.

One real campaign (tiny models, the local executor, three baseline trials) is run once per
module; each test works on its own copy of it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import optuna
import pytest
import yaml

from search import storage as S
from search import trials as T
from search.campaign import CampaignError, MAX_SEED, parse_campaign
from search.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _campaign_data(models: dict[str, str], **over) -> dict:
    return {"name": "adv", "base_model": models["base"], "models": [models["ft_a"], models["ft_b"]],
            "method": "ties", "sampler": "random",
            "search": {"granularity": "global", "params": {"weight": [0.0, 1.0]}},
            "objectives": {"legal": 1.0}, "eval": {"suite": "sample", "limit": 4, "stage1": False},
            "budget": {"trials": 3}, "workers": {"count": 1, "executor": "local", "gpus_per_worker": 0},
            "seed": 0, **over}


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def models(tiny_zoo, tmp_path_factory) -> dict[str, Path]:
    """Copies of the zoo's base and two fine-tunes (tests change their weights)."""
    root = tmp_path_factory.mktemp("adv-models")
    return {k: Path(shutil.copytree(tiny_zoo[k], root / k)) for k in ("base", "ft_a", "ft_b")}


@pytest.fixture(scope="module")
def ran(models, tmp_path_factory) -> Path:
    """A finished campaign directory (its campaign.yaml is the copy the driver wrote)."""
    root = tmp_path_factory.mktemp("adv-ran")
    cfg = _write(root / "c.yaml", _campaign_data({k: str(v) for k, v in models.items()}))
    assert main(["search", str(cfg), "--dir", str(root / "camp"), "--quiet"]) == 0
    return root / "camp"


@pytest.fixture
def camp(ran, tmp_path) -> Path:
    return Path(shutil.copytree(ran, tmp_path / "camp"))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _rewrite_weights(folder: Path, scale: float) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    save_file({k: v * scale for k, v in tensors.items()}, str(f), metadata={"format": "pt"})


# -- 2. --resume and models that changed ---------------------------------------------------------

def test_the_study_records_each_model_identity(camp, models):
    study = S.load_study(camp)
    sources = T.recorded_sources(study)
    assert [m["path"] for m in sources] == [str(models[k].resolve()) for k in ("base", "ft_a", "ft_b")]
    assert all(len(h) == 64 for m in sources for h in m["files"].values())
    assert (camp / ".brmerge-hashes.json").is_file()


def test_resume_refuses_replaced_weights_unless_accepted(camp, models, tmp_path, capsys):
    weights = models["ft_a"] / "model.safetensors"
    original = weights.read_bytes()
    n_before = len(S.load_study(camp).trials)
    cfg = _write(tmp_path / "c.yaml", _campaign_data({k: str(v) for k, v in models.items()}, budget={"trials": 4}))
    try:
        _rewrite_weights(models["ft_a"], 1.5)   # the fine-tune retrained in place
        assert main(["search", str(cfg), "--dir", str(camp), "--resume", "--quiet"]) == 2
        line = _one_line(capsys)
        assert f"model '{models['ft_a']}'" in line and "weights changed" in line
        assert "--accept-changed-models" in line
        assert len(S.load_study(camp).trials) == n_before

        assert main(["search", str(cfg), "--dir", str(camp), "--resume", "--accept-changed-models",
                     "--quiet"]) == 0
        study = S.load_study(camp)
        assert len(T.finished_trials(study)) == 4
        assert T.cache_start(study) == n_before           # the genome cache starts again
        assert "genome cache starts again" in (camp / "campaign.log").read_text()
        # the new identity is recorded: resuming with these models needs no flag now
        _write(cfg, _campaign_data({k: str(v) for k, v in models.items()}, budget={"trials": 5}))
        assert main(["search", str(cfg), "--dir", str(camp), "--resume", "--quiet"]) == 0
    finally:
        weights.write_bytes(original)


def test_resume_from_another_directory_with_relative_paths_is_refused(models, tmp_path, monkeypatch, capsys):
    for place in ("a", "b"):
        for k, src in models.items():
            shutil.copytree(src, tmp_path / place / "models" / k)
    rel = {k: f"models/{k}" for k in models}
    cfg = _write(tmp_path / "c.yaml", _campaign_data(rel, budget={"trials": 1}))
    camp = tmp_path / "camp"
    monkeypatch.chdir(tmp_path / "a")
    assert main(["search", str(cfg), "--dir", str(camp), "--quiet"]) == 0
    capsys.readouterr()
    _write(cfg, _campaign_data(rel, budget={"trials": 2}))
    monkeypatch.chdir(tmp_path / "b")   # the same bytes, but other folders
    assert main(["search", str(cfg), "--dir", str(camp), "--resume", "--quiet"]) == 2
    line = _one_line(capsys)
    assert "model 'models/base' resolves to" in line and str(tmp_path / "b") in line and "another directory" in line
    assert len(T.finished_trials(S.load_study(camp))) == 1


def test_the_genome_cache_ignores_trials_before_the_models_changed(tmp_path):
    from search.scheduler import Scheduler

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's.db'}")
    study = optuna.create_study(storage=storage, study_name="c", direction="maximize")
    for digest in ("old", "new"):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        T.record_asked(trial, digest=digest, recipe_yaml="r")
        study.tell(trial, 0.5)
    before = Scheduler(study=study, storage=storage, space=None, budget=5)
    assert set(before.cache) == {"old", "new"}
    T.record_cache_start(study, 1)
    after = Scheduler(study=study, storage=storage, space=None, budget=5)
    assert set(after.cache) == {"new"}


# -- 8. the budget shown, empty and missing study files -------------------------------------------

def test_status_shows_the_budget_of_the_latest_resume(camp, models, tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", _campaign_data({k: str(v) for k, v in models.items()}, budget={"trials": 4}))
    assert main(["search", str(cfg), "--dir", str(camp), "--resume", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["status", str(camp)]) == 0
    assert capsys.readouterr().out.startswith("progress: 4/4 trials")


def test_status_on_an_empty_study_file_is_one_line_and_writes_nothing(camp, capsys):
    (camp / "study.db").write_bytes(b"")
    assert main(["status", str(camp)]) == 2
    line = _one_line(capsys)
    assert "study.db" in line and "empty" in line
    assert (camp / "study.db").stat().st_size == 0
    assert main(["dashboard", str(camp), "--port", "8123"]) == 2
    assert (camp / "study.db").stat().st_size == 0


def test_resume_without_a_study_says_so_and_creates_no_file(models, tmp_path, capsys):
    cfg = _write(tmp_path / "c.yaml", _campaign_data({k: str(v) for k, v in models.items()}))
    camp = tmp_path / "camp"
    assert main(["search", str(cfg), "--dir", str(camp), "--resume", "--quiet"]) == 2
    assert "nothing to resume" in _one_line(capsys)
    assert not (camp / "study.db").exists()


# -- 7. damaged storage and records ----------------------------------------------------------------

def test_damaged_sqlite_pages_are_one_line_naming_the_file(camp, capsys):
    db = camp / "study.db"
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    assert len(data) > 3 * page
    data[page:] = b"\xa5" * (len(data) - page)   # every page but the first (the schema) overwritten
    db.write_bytes(bytes(data))
    assert main(["status", str(camp)]) == 2
    line = _one_line(capsys)
    assert str(db) in line and "damaged" in line and "backup" in line


def test_a_damaged_exports_json_is_refused_before_the_export(camp, tmp_path, capsys):
    (camp / "exports.json").write_text('[{"trial": 0, "out": "x"')   # cut off mid-write
    out = tmp_path / "merged"
    assert main(["export", str(camp), "--out", str(out)]) == 2
    line = _one_line(capsys)
    assert "exports.json" in line and "backup" in line
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


def test_an_export_record_is_never_lost(camp, tmp_path):
    from search.errors import SearchError
    from search.export import _record_export

    (camp / "exports.json").write_text("{not json")   # damaged while the export ran
    with pytest.raises(SearchError) as err:
        _record_export(camp, {"trial": 1, "out": str(tmp_path / "m")}, tmp_path / "m")
    (aside,) = camp.glob("exports.*-*.json")
    assert str(aside) in str(err.value) and json.loads(aside.read_text())[0]["trial"] == 1
    assert (camp / "exports.json").read_text() == "{not json"


@pytest.mark.parametrize("over, words", [
    ({"workers": {"count": 1_000_000_000}}, "workers.count 1000000000"),
    ({"workers": {"count": "1e9"}}, "workers.count '1e9'"),
    ({"seed": 2**200}, f"to {MAX_SEED}"),
    ({"seed": -1}, "seed -1"),
])
def test_absurd_counts_and_seeds_are_refused_before_a_study(models, tmp_path, capsys, over, words):
    data = _campaign_data({k: str(v) for k, v in models.items()}, **over)
    with pytest.raises(CampaignError, match="must be"):
        parse_campaign(data)
    cfg = _write(tmp_path / "c.yaml", data)
    assert main(["search", str(cfg), "--dir", str(tmp_path / "camp"), "--quiet"]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "camp").exists()
    assert main(["search", str(cfg), "--workers", "100000", "--quiet"]) == 2


def test_a_truncated_fine_tune_is_one_line_before_a_study(models, tmp_path, capsys):
    broken = Path(shutil.copytree(models["ft_a"], tmp_path / "ft_cut"))
    weights = broken / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    data = _campaign_data({"base": str(models["base"]), "ft_a": str(broken), "ft_b": str(models["ft_b"])})
    cfg = _write(tmp_path / "c.yaml", data)
    assert main(["search", str(cfg), "--dir", str(tmp_path / "camp"), "--quiet"]) == 2
    assert str(weights) in _one_line(capsys)
    assert not (tmp_path / "camp" / "study.db").exists() and not (tmp_path / "camp" / "campaign.yaml").exists()


@pytest.mark.parametrize("template, words", [
    (None, "no chat template"),
    ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    ("{% for m in messages %}{{ m.content }", "fails to render"),
])
def test_a_bad_chat_template_is_one_line_before_a_study(models, tmp_path, capsys, template, words):
    base = Path(shutil.copytree(models["base"], tmp_path / "base"))
    config = base / "tokenizer_config.json"
    tok = json.loads(config.read_text())
    tok.pop("chat_template", None)
    if template is not None:
        tok["chat_template"] = template
    config.write_text(json.dumps(tok))
    for extra in base.glob("chat_template.j*"):
        extra.unlink()
    data = _campaign_data({"base": str(base), "ft_a": str(models["ft_a"]), "ft_b": str(models["ft_b"])})
    data["eval"]["chat_template"] = True
    cfg = _write(tmp_path / "c.yaml", data)
    assert main(["search", str(cfg), "--dir", str(tmp_path / "camp"), "--quiet"]) == 2
    assert words in _one_line(capsys)
    assert not (tmp_path / "camp" / "study.db").exists() and not (tmp_path / "camp" / "campaign.yaml").exists()


# -- 3. links planted in a campaign directory ------------------------------------------------------

@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def _untouched(victim: Path) -> bool:
    return victim.read_text() == "precious\n"


@pytest.mark.parametrize("name", ["campaign.log", ".brmerge.lock", "campaign.yaml", ".brmerge-hashes.json"])
def test_a_resume_never_writes_through_a_planted_link(camp, models, tmp_path, victim, capsys, name):
    cfg = _write(tmp_path / "c.yaml", _campaign_data({k: str(v) for k, v in models.items()}, budget={"trials": 4}))
    (camp / name).unlink()
    (camp / name).symlink_to(victim)
    assert main(["search", str(cfg), "--dir", str(camp), "--resume", "--quiet"]) == 2
    line = _one_line(capsys)
    assert name in line and "symbolic link" in line
    assert _untouched(victim)


def test_report_never_writes_through_planted_links(camp, tmp_path, victim, capsys):
    report = camp / "report"
    report.mkdir(exist_ok=True)
    (report / "report.html").symlink_to(victim)
    assert main(["report", str(camp)]) == 2
    assert "report.html" in _one_line(capsys) and _untouched(victim)
    (report / "report.html").unlink()
    (report / "history.png").unlink(missing_ok=True)   # drawn before the page was refused
    (report / "history.png").symlink_to(victim)
    assert main(["report", str(camp)]) == 2
    assert "history.png" in _one_line(capsys) and _untouched(victim)
    shutil.rmtree(report)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    report.symlink_to(elsewhere, target_is_directory=True)
    assert main(["report", str(camp)]) == 2
    assert "report" in _one_line(capsys) and list(elsewhere.iterdir()) == []
    report.unlink()
    assert main(["report", str(camp)]) == 0 and (report / "report.html").is_file()


def test_an_export_record_is_never_written_through_a_link(camp, tmp_path, victim, capsys):
    from search.export import _record_export

    (camp / "exports.json").symlink_to(victim)
    with pytest.raises(Exception) as err:
        _record_export(camp, {"trial": 0}, tmp_path / "m")
    assert "exports.json" in str(err.value) and _untouched(victim)


def test_campaign_files_helpers_refuse_links_and_replace_atomically(tmp_path, victim):
    from search.campaign_files import CampaignFileError, append_text, replace_text

    link = tmp_path / "log"
    link.symlink_to(victim)
    with pytest.raises(CampaignFileError, match="symbolic link"):
        append_text(link, "x\n")
    with pytest.raises(CampaignFileError, match="symbolic link"):
        replace_text(link, "x\n")
    assert _untouched(victim)
    real = tmp_path / "real.txt"
    append_text(real, "a\n")
    append_text(real, "b\n")
    assert real.read_text() == "a\nb\n"
    replace_text(real, "c\n")
    assert real.read_text() == "c\n" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
