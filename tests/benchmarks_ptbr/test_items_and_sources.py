"""Bad data errors (file:line), typed values, splits and skip counts on the shared data."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks_ptbr.items import DataError
from benchmarks_ptbr.sources import DOMAINS, load_data_dir


def _oab_row(i: int, **over) -> dict:
    row = {"id": f"2012-06_{i}", "exam_id": "2012-06", "exam_year": "2012", "question": f"Q{i}?",
           "choices": [{"label": k, "text": f"opção {k}"} for k in "ABCD"], "answerKey": "B",
           "nullified": False, "usable_text_only": True}
    row.update(over)
    return row


def _write(root: Path, rows: list, folder: str = "oab_exams") -> Path:
    path = root / folder / "derived" / "items.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path, [_oab_row(1), '{"id": "2012-06_2", "question": '])
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON"):
        load_data_dir("legal", tmp_path)


def test_key_not_among_labels_names_file_and_line(tmp_path):
    path = _write(tmp_path, [_oab_row(1), _oab_row(2), _oab_row(3, answerKey="E")])
    with pytest.raises(DataError, match=rf"{path}:3: item '2012-06_3': answerKey 'E' is not among"):
        load_data_dir("legal", tmp_path)


def test_duplicate_ids_name_both_lines(tmp_path):
    path = _write(tmp_path, [_oab_row(1), _oab_row(2), _oab_row(1)])
    with pytest.raises(DataError, match=rf"{path}:3: duplicate id '2012-06_1' \(first seen at {path}:1\)"):
        load_data_dir("legal", tmp_path)


def test_missing_year_and_bad_flag_are_errors(tmp_path):
    row = _oab_row(1)
    del row["exam_year"]
    path = _write(tmp_path, [row])
    with pytest.raises(DataError, match=rf"{path}:1: .*no 'year'"):
        load_data_dir("legal", tmp_path)
    path = _write(tmp_path, [_oab_row(1, usable_text_only="maybe")])
    with pytest.raises(DataError, match=rf"{path}:1: field 'usable_text_only' = 'maybe'"):
        load_data_dir("legal", tmp_path)


def test_string_typed_values_and_skip_counts(tmp_path):
    rows = [_oab_row(1), _oab_row(2, usable_text_only="false"), _oab_row(3, nullified="true"),
            _oab_row(4, answerKey=None), _oab_row(5, exam_year=2016), _oab_row(6, exam_year="2030")]
    _write(tmp_path, rows)
    loaded = load_data_dir("legal", tmp_path)
    assert [i.id for i in loaded.items["dev"]] == ["2012-06_1"]
    assert [i.id for i in loaded.items["test"]] == ["2012-06_5"]
    assert loaded.skipped["dev"] == {"not_text_only": 1, "annulled": 1, "no_key": 1,
                                     "year_outside_splits": 1}
    assert loaded.skipped["test"] == {"year_outside_splits": 1}
    assert loaded.items["dev"][0].year == 2012 and loaded.items["dev"][0].exam == "2012-06"


def test_missing_data_dir_and_missing_domain_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data_dir("legal", tmp_path / "nope")
    with pytest.raises(DataError, match="oab_exams/derived/\\*.jsonl"):
        load_data_dir("legal", tmp_path)


EXPECTED_YEARS = {
    "legal": (set(range(2010, 2015)), set(range(2015, 2019))),
    "health": (set(range(2017, 2022)) | {2013, 2019, 2020}, set(range(2021, 2025))),
    "enem": (set(range(2009, 2022)), set(range(2022, 2025))),
}


@pytest.mark.parametrize("domain", DOMAINS)
def test_shared_data_splits_by_year_without_shared_exams(data_dir, domain):
    loaded = load_data_dir(domain, data_dir)
    dev, test = loaded.items["dev"], loaded.items["test"]
    assert dev and test
    assert not {(i.source, i.exam) for i in dev} & {(i.source, i.exam) for i in test}
    assert not {i.id for i in dev} & {i.id for i in test}
    if domain in EXPECTED_YEARS:
        dev_years, test_years = EXPECTED_YEARS[domain]
        assert {i.year for i in dev} <= dev_years and {i.year for i in test} <= test_years
    if domain == "health":
        # Teste de Progresso 2021 is test while Revalida 2021 is dev: per-source tables.
        assert {i.year for i in dev if i.source == "teste_progresso"} == {2013, 2019, 2020}
        assert {i.year for i in test if i.source == "revalida"} == {2022, 2023, 2024}


def test_shared_data_skip_counts_match_the_sources_notes(data_dir):
    legal = load_data_dir("legal", data_dir)
    # SOURCES.md: 2220 OAB items, 10 annulled, 2210 usable; no OAB item has a `problem`.
    assert len(legal.items["dev"]) + len(legal.items["test"]) == 2210
    assert legal.skipped["dev"]["annulled"] + legal.skipped["test"]["annulled"] == 10
    enem = load_data_dir("enem", data_dir)
    # SOURCES.md: usable 2009-2021 (English track) sums to 1420, 2022 110 + 2023 118 + 2024 123
    # = 351; the later review marks 56 ENEM items `missing_context` (55 in 2012-2017, one in
    # 2023) and 7 ENEM items `duplicate_options` (2009-2019). Each is a skip reason of its own.
    assert enem.skipped["dev"]["missing_context"] == 55
    assert enem.skipped["dev"]["duplicate_options"] == 7
    assert enem.skipped["test"]["missing_context"] == 1
    assert len(enem.items["dev"]) == 1420 - 55 - 7 and len(enem.items["test"]) == 351 - 1
    assert enem.skipped["dev"]["other_language_track"] > 0
    assert not any(i.id.endswith("_espanhol") for i in enem.items["dev"] + enem.items["test"])
    health = load_data_dir("health", data_dir)
    # 855 Revalida + 719 Teste de Progresso usable before the review, which marks 152 Revalida
    # `duplicate_of:<id>` (reported as `duplicate`), 20 `conflicting_keys`, and one Teste de
    # Progresso item (2023) `duplicate_options`.
    skipped = Counter(health.skipped["dev"]) + Counter(health.skipped["test"])
    assert skipped["duplicate"] == 152 and skipped["conflicting_keys"] == 20
    assert health.skipped["test"]["duplicate_options"] == 1
    assert len(health.items["dev"]) + len(health.items["test"]) == 855 + 719 - 152 - 20 - 1
    assert sum(skipped.values()) == 145 + 1 + 152 + 20 + 1
    hb = load_data_dir("healthbench", data_dir)
    assert len(hb.items["dev"]) + len(hb.items["test"]) == 1000
    assert {i.labels for i in hb.items["dev"]} == {("A", "B")}


def test_repeated_content_is_skipped_as_duplicate_or_conflicting_keys(tmp_path):
    same = {"question": "Qual é o prazo?", "choices": [{"label": k, "text": f"opção {k}"}
                                                      for k in "ABCD"]}
    reordered = {"question": "  QUAL é o  prazo? ",  # same content: case, spaces, option order
                 "choices": [{"label": k, "text": f"opção {t}."} for k, t in zip("ABCD", "DCBA")]}
    rows = [_oab_row(1, **same), _oab_row(2, **reordered, answerKey="C"),  # C is "opção B" here
            _oab_row(3, question="Outra?"), _oab_row(4, question="Outra?", answerKey="A"),
            _oab_row(5, question="Outra?"), _oab_row(6, **same, exam_year=2016),
            _oab_row(7, question="Única?")]
    _write(tmp_path, rows)
    loaded = load_data_dir("legal", tmp_path)
    # 2 repeats 1 with the same answer text: the first is kept. 3, 4, 5 share content under
    # two keys: none of them can be scored. 6 is in the other split, so it is no repeat.
    assert [i.id for i in loaded.items["dev"]] == ["2012-06_1", "2012-06_7"]
    assert loaded.skipped["dev"] == {"duplicate": 1, "conflicting_keys": 3}
    assert [i.id for i in loaded.items["test"]] == ["2012-06_6"]


def test_problem_field_is_the_skip_reason(tmp_path):
    rows = [_oab_row(1), _oab_row(2, problem="duplicate_of:2012-06_1", usable_text_only=False),
            _oab_row(3, problem="missing_context", usable_text_only=False),
            _oab_row(4, problem="conflicting_keys"), _oab_row(5, answerKey=None),
            {k: v for k, v in _oab_row(6).items() if k != "answerKey"}]
    _write(tmp_path, rows)
    loaded = load_data_dir("legal", tmp_path)
    assert [i.id for i in loaded.items["dev"]] == ["2012-06_1"]
    assert loaded.skipped["dev"] == {"duplicate": 1, "missing_context": 1,
                                     "conflicting_keys": 1, "no_key": 2}
    path = _write(tmp_path, [_oab_row(1, problem="")])
    with pytest.raises(DataError, match=rf"{path}:1: field 'problem' = '' is not a reason"):
        load_data_dir("legal", tmp_path)


def test_content_guard_finds_what_the_review_marked(data_dir, tmp_path):
    # The shared Revalida file with its review marks removed: the loader's own guard must find
    # the repeats that the review marked (151 of its 152 `duplicate_of`: one copy was
    # re-worded, not just re-punctuated) and all 20 `conflicting_keys`.
    source = data_dir / "revalida" / "derived" / "revalida_2017_2024.jsonl"
    marked, rows = {}, []
    for line in source.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "problem" in row:
            marked[row["id"]] = row.pop("problem").split(":")[0]
            row["usable_text_only"] = True
        rows.append(row)
    _write(tmp_path, rows, folder="revalida")
    (tmp_path / "teste_progresso" / "derived").mkdir(parents=True)
    loaded = load_data_dir("health", tmp_path)
    assert Counter(marked.values()) == {"duplicate_of": 152, "conflicting_keys": 20}
    assert loaded.skipped["dev"]["duplicate"] == 151
    assert loaded.skipped["dev"]["conflicting_keys"] == 20
    kept = {i.id for i in loaded.items["dev"] + loaded.items["test"]}
    assert len(set(marked) & kept) == 1
