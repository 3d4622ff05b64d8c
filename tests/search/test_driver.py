"""The driver refuses bad campaigns before a study exists or Ray starts, and guards resumes."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml

from search import storage as S
from search import trials as T
from search.campaign import load_campaign
from search.cli import main
from search.driver import Driver
from search.errors import DriverError


def _campaign(path, zoo, **over) -> dict:
    data = {"name": "guard", "base_model": str(zoo["base"]), "models": [str(zoo["ft_a"]), str(zoo["ft_b"])],
            "method": "ties", "sampler": "random",
            "search": {"granularity": "global", "params": {"weight": [0.0, 1.0]}},
            "objectives": {"legal": 1.0}, "eval": {"suite": "sample", "limit": 6, "stage1": False},
            "budget": {"trials": 3}, "workers": {"count": 1}, "seed": 0, **over}
    path.write_text(yaml.safe_dump(data))
    return data


def test_a_missing_model_is_one_line_before_any_study_or_ray(tiny_zoo, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    _campaign(cfg, tiny_zoo, models=[str(tiny_zoo["ft_a"]), str(tmp_path / "no-such-model")])
    directory = tmp_path / "camp"
    assert main(["search", str(cfg), "--dir", str(directory), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0]
    assert not (directory / "study.db").exists() and not (directory / "campaign.yaml").exists()
    import ray

    assert not ray.is_initialized()


def test_an_incompatible_model_is_refused_before_the_study(tiny_zoo, tmp_path, capsys):
    from search.demo.tiny import llama_config, make_llama

    other = make_llama(tmp_path / "wide", seed=3, config=llama_config(hidden=48),
                       tokenizer_dir=tiny_zoo["tokenizer"])
    capsys.readouterr()   # the model writer's progress bars
    cfg = tmp_path / "c.yaml"
    _campaign(cfg, tiny_zoo, models=[str(tiny_zoo["ft_a"]), str(other)])
    assert main(["search", str(cfg), "--dir", str(tmp_path / "camp"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wide" in err[0]
    assert not (tmp_path / "camp" / "study.db").exists()


def _existing_study(directory, raw) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name=raw["name"], direction="maximize",
                                storage=f"sqlite:///{directory / 'study.db'}")
    study.set_user_attr(T.S_CAMPAIGN, S.public_campaign(raw))


def test_a_refused_search_leaves_campaign_yaml_as_it_was(tiny_zoo, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    raw = _campaign(cfg, tiny_zoo)
    directory = tmp_path / "camp"
    _existing_study(directory, raw)
    (directory / "campaign.yaml").write_text("# the campaign that ran\n" + yaml.safe_dump(raw))
    before = (directory / "campaign.yaml").read_text()
    _campaign(cfg, tiny_zoo, method="dare_ties")
    assert main(["search", str(cfg), "--dir", str(directory), "--quiet"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert (directory / "campaign.yaml").read_text() == before


def test_resume_refuses_a_changed_search_and_lists_the_differences(tiny_zoo, tmp_path):
    cfg = tmp_path / "c.yaml"
    raw = _campaign(cfg, tiny_zoo)
    directory = tmp_path / "camp"
    _existing_study(directory, raw)
    _campaign(cfg, tiny_zoo, method="dare_ties", search={"granularity": "global", "params": {"weight": [0.0, 2.0]}})
    with pytest.raises(DriverError) as err:
        Driver(load_campaign(cfg), directory, resume=True, progress=False).run()
    text = str(err.value)
    assert "method: 'ties' -> 'dare_ties'" in text and "params:" in text
    assert "budget" in text   # says what may change


def test_resume_accepts_a_new_budget_and_worker_count(tiny_zoo, tmp_path):
    cfg = tmp_path / "c.yaml"
    raw = _campaign(cfg, tiny_zoo)
    directory = tmp_path / "camp"
    _existing_study(directory, raw)
    _campaign(cfg, tiny_zoo, budget={"trials": 9}, workers={"count": 2})
    driver = Driver(load_campaign(cfg), directory, resume=True, progress=False)
    study, _, _, _ = driver._open(S.resolve(driver.campaign, directory), driver._preflight())
    driver._record_campaign(study)     # no error: only budget and workers changed
    assert json.loads(json.dumps(study.user_attrs[T.S_CAMPAIGN]))["budget"] == {"trials": 3}


def test_the_campaign_copy_in_the_directory_holds_no_password(tiny_zoo, tmp_path):
    cfg = tmp_path / "c.yaml"
    _campaign(cfg, tiny_zoo, storage="postgresql+psycopg://brmerge:hunter2@db.example:5432/brmerge")
    text = cfg.read_text()
    assert "hunter2" in text
    driver = Driver(load_campaign(cfg), tmp_path / "camp", progress=False)
    driver._record_campaign(None)      # what a new study's driver writes
    copy = (tmp_path / "camp" / "campaign.yaml").read_text()
    assert "hunter2" not in copy and "brmerge:***@db.example" in copy


def test_negative_workers_is_a_one_line_error(tiny_zoo, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    _campaign(cfg, tiny_zoo)
    assert main(["search", str(cfg), "--dir", str(tmp_path / "camp"), "--workers", "-1", "--quiet"]) == 2
    assert "--workers -1" in capsys.readouterr().err
    assert not (tmp_path / "camp").exists()


def test_a_model_asking_for_remote_code_is_refused_before_the_study(tiny_zoo, tmp_path, capsys):
    import shutil

    remote = tmp_path / "remote-ft"
    shutil.copytree(tiny_zoo["ft_a"], remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (remote / "config.json").write_text(json.dumps(config))
    cfg = tmp_path / "c.yaml"
    _campaign(cfg, tiny_zoo, models=[str(remote), str(tiny_zoo["ft_b"])])
    assert main(["search", str(cfg), "--dir", str(tmp_path / "camp"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "remote-ft" in err[0]
    assert not (tmp_path / "camp" / "study.db").exists()
