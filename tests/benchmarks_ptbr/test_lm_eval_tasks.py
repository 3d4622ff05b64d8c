"""The lm-eval task folder: generated YAML is current, and stock lm-eval runs the tasks."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from benchmarks_ptbr.lm_eval_tasks import TASKS_DIR, render  # noqa: E402
from benchmarks_ptbr.sources import DOMAINS, SAMPLE_DOMAINS  # noqa: E402


def test_shipped_yaml_matches_the_generator():
    expected = render()
    shipped = {p.name: p.read_text(encoding="utf-8") for p in TASKS_DIR.glob("*.yaml")}
    assert shipped == expected, "run: python -m benchmarks_ptbr.lm_eval_tasks"
    for domain in DOMAINS:
        for split in ("dev", "test"):
            assert f"ptbr_{domain}_{split}.yaml" in shipped
            assert f"ptbr_{domain}_{split}_gen.yaml" in shipped
    for domain in SAMPLE_DOMAINS:
        assert f"ptbr_sample_{domain}_dev.yaml" in shipped
    assert {"_ptbr_dev.yaml", "_ptbr_test.yaml", "_ptbr_sample_dev.yaml"} <= set(shipped)


def test_task_manager_indexes_tasks_and_groups():
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    names = set(tm.all_tasks)
    assert {"ptbr_legal_dev", "ptbr_enem_test_gen", "ptbr_dev", "ptbr_test",
            "ptbr_sample_dev", "ptbr_sample_health_test"} <= names


def test_data_task_without_data_dir_fails_clearly(monkeypatch):
    monkeypatch.delenv("BRMERGE_DATA_DIR", raising=False)
    import importlib.util

    spec = importlib.util.spec_from_file_location("ptbr_utils", TASKS_DIR / "ptbr_utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(ValueError, match="BRMERGE_DATA_DIR"):
        module.load_task(domain="legal", split="dev", source="data")
    ds = module.load_task(domain="legal", split="dev", source="sample", version=1.0)
    assert len(ds["fewshot"]) == 3 and len(ds["test"]) == 15
    assert ds["test"][0]["query"].endswith("Resposta correta:")
    assert module.process_gen_results(ds["test"][0], [" Resposta: " + ds["test"][0]["answer"]]) \
        == {"acc": 1.0}
