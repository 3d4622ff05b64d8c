"""Hub dataset mapping, exercised on local files laid out like the hub datasets."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets is imported: never the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from benchmarks_ptbr.hub import load_hub  # noqa: E402
from benchmarks_ptbr.items import DataError, SuiteError  # noqa: E402
from benchmarks_ptbr.suite import load_suite  # noqa: E402


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _oab(exam, n, year, key="A", nullified=False):
    return {"id": f"{exam}_{n}", "question_number": n, "exam_id": exam, "exam_year": year,
            "question": f"Questão {n} do exame {exam}?",
            "choices": {"text": ["um", "dois", "três", "quatro"], "label": ["A", "B", "C", "D"]},
            "answerKey": key, "nullified": nullified}


@pytest.fixture()
def hub_copies(tmp_path):
    oab = tmp_path / "oab_exams"
    _jsonl(oab / "train.jsonl", [
        _oab("2010-01", 1, "2010"), _oab("2010-01", 2, "2010", key="C"),
        _oab("2010-01", 3, "2010", key="", nullified=True), _oab("2016-19", 1, "2016", key="D"),
    ])
    challenge = tmp_path / "enem_challenge"
    _jsonl(challenge / "train.jsonl", [
        {"id": "2010_5", "exam_id": "2010", "question": "Texto 2010?", "description": [],
         "choices": {"text": list("vwxyz"), "label": list("ABCDE")}, "answerKey": "E"},
        {"id": "2022_21", "exam_id": "2022", "question": "Texto 2022?", "description": [],
         "choices": {"text": list("vwxyz"), "label": list("ABCDE")}, "answerKey": "B"},
    ])
    maritaca = tmp_path / "maritaca_enem"
    base = {"exam": "2022", "IU": False, "ledor": False, "figures": [], "description": [],
            "alternatives": ["a", "b", "c", "d", "e"]}
    _jsonl(maritaca / "2022.jsonl", [
        {**base, "id": "questao_21", "question": "Texto 2022?", "label": "B"},  # mirrored
        {**base, "id": "questao_22", "question": "Outro 2022?", "label": "C"},
        {**base, "id": "questao_23", "question": "[[placeholder]] Figura?", "label": "A", "IU": True,
         "figures": ["f.png"]},
        {**base, "id": "questao_24", "question": "Anulada?", "label": "Anulado"},
    ])
    return {"eduagarcia/oab_exams": str(oab), "eduagarcia/enem_challenge": str(challenge),
            "maritaca-ai/enem": str(maritaca)}


def test_oab_hub_layout_maps_to_schema(hub_copies):
    legal = load_hub("legal", paths=hub_copies)
    dev, test = legal.items["dev"], legal.items["test"]
    assert [(i.id, i.answer, i.exam, i.year) for i in dev] == [
        ("2010-01_1", "A", "2010-01", 2010), ("2010-01_2", "C", "2010-01", 2010)]
    assert dev[0].labels == ("A", "B", "C", "D") and dev[0].texts[2] == "três"
    assert [i.id for i in test] == ["2016-19_1"]
    assert legal.skipped["dev"] == {"annulled": 1}


def test_enem_hub_layouts_map_and_mirrors_are_counted(hub_copies):
    enem = load_hub("enem", paths=hub_copies)
    assert [(i.id, i.answer) for i in enem.items["dev"]] == [("enem_2010_5", "E")]
    assert [(i.id, i.answer, i.source) for i in enem.items["test"]] == [
        ("enem_2022_21", "B", "eduagarcia/enem_challenge"),
        ("enem_2022_22", "C", "maritaca-ai/enem")]
    assert enem.skipped["test"] == {"in_other_mirror": 1, "not_text_only": 1, "annulled": 1}


def test_hub_suite_and_bad_hub_rows(hub_copies, tmp_path):
    suite = load_suite(split="test", source="hub", domains=["legal"], hub_paths=hub_copies,
                       num_fewshot=2)   # the copy has 2 dev items
    assert [i.id for i in suite.tasks[0].items] == ["2016-19_1"]
    with pytest.raises(SuiteError, match="no Hugging Face dataset is mapped for the 'health'"):
        load_hub("health", paths=hub_copies)
    bad = tmp_path / "bad_oab"
    _jsonl(bad / "train.jsonl", [_oab("2010-01", 1, "2010", key="E")])
    with pytest.raises(DataError, match=r"eduagarcia/oab_exams\[train\]:1: .*answerKey 'E'"):
        load_hub("legal", paths={"eduagarcia/oab_exams": str(bad)})
