"""Few-shot selection, limit stratification, prompts and answer extraction."""

from __future__ import annotations

from collections import Counter

import pytest

from benchmarks_ptbr.extract import INVALID, extract_letter
from benchmarks_ptbr.fewshot import FEWSHOT_IDS, SAMPLE_FEWSHOT_IDS
from benchmarks_ptbr.items import Item, SuiteError
from benchmarks_ptbr.prompts import build_context, format_query
from benchmarks_ptbr.sources import load_sample
from benchmarks_ptbr.suite import load_suite, resolve_data_dir, stratified_limit


@pytest.mark.parametrize("split", ["dev", "test"])
def test_sample_fewshot_come_from_dev_and_are_never_scored(split):
    suite = load_suite(split=split, source="sample")
    for task in suite.tasks:
        dev_ids = {i.id for i in load_sample(task.domain).items["dev"]}
        shot_ids = [s.id for s in task.shots]
        assert shot_ids == list(SAMPLE_FEWSHOT_IDS[task.domain])
        assert set(shot_ids) <= dev_ids
        assert not set(shot_ids) & {i.id for i in task.items}
        if split == "dev":
            assert task.skipped["fewshot"] == 3
            assert len(task.items) == len(dev_ids) - 3


def test_data_fewshot_are_fixed_dev_items_and_never_scored(data_dir):
    dev = load_suite(split="dev", source="data", data_dir=data_dir)
    test = load_suite(split="test", source="data", data_dir=data_dir)
    for d_task, t_task in zip(dev.tasks, test.tasks):
        assert [s.id for s in d_task.shots] == list(FEWSHOT_IDS[d_task.domain])
        assert d_task.shots == t_task.shots  # the test task also draws its shots from dev
        scored = {i.id for i in d_task.items} | {i.id for i in t_task.items}
        assert not scored & {s.id for s in d_task.shots}
    hb = dev.task("ptbr_healthbench_dev")
    # the shots' true/false twins are excluded too: hbbr_001_00/01 are a pair, 001_02 pairs 001_03
    assert "hbbr_001_03" not in {i.id for i in hb.items} and hb.skipped["fewshot"] == 4


def test_num_fewshot_zero_scores_everything_and_changes_the_prompt():
    zero = load_suite(split="dev", source="sample", domains=["legal"], num_fewshot=0).tasks[0]
    three = load_suite(split="dev", source="sample", domains=["legal"]).tasks[0]
    assert zero.shots == () and len(zero.items) == len(three.items) + 3
    item = three.items[0]
    assert zero.context(item) != three.context(item)
    assert three.context(item).count("Resposta correta:") == 4


def _items(spec: dict[str, int]) -> list[Item]:
    return [Item(id=f"{exam}_{k}", question="q", labels=("A", "B"), texts=("x", "y"), answer="A",
                 year=2010, exam=exam, source="t")
            for exam, count in spec.items() for k in range(count)]


def test_limit_is_stratified_by_exam_and_deterministic():
    items = _items({"e1": 100, "e2": 50, "e3": 30, "e4": 20})
    chosen = stratified_limit(items, 20)
    assert len(chosen) == 20
    assert Counter(i.exam for i in chosen) == {"e1": 10, "e2": 5, "e3": 3, "e4": 2}
    assert stratified_limit(list(reversed(items)), 20) == tuple(reversed(chosen))
    assert stratified_limit(items, 20) == chosen
    assert [i for i in items if i in chosen] == list(chosen)  # original order kept
    assert stratified_limit(items, 500) == tuple(items)
    with pytest.raises(SuiteError, match="limit=0"):
        stratified_limit(items, 0)


def test_limit_on_shared_data_spreads_over_exams(data_dir):
    full = load_suite(split="dev", source="data", data_dir=data_dir, domains=["legal"]).tasks[0]
    cut = load_suite(split="dev", source="data", data_dir=data_dir, domains=["legal"],
                     limit=50).tasks[0]
    assert len(cut.items) == 50 and cut.n_available == len(full.items)
    total, counts = Counter(i.exam for i in full.items), Counter(i.exam for i in cut.items)
    for exam, n in total.items():
        assert abs(counts[exam] - 50 * n / len(full.items)) < 1
    again = load_suite(split="dev", source="data", data_dir=data_dir, domains=["legal"], limit=50)
    assert again.tasks[0].items == cut.items


def test_prompt_layout():
    item = Item(id="x", question="Quanto é 2+2?", labels=("A", "B"), texts=("3", "4"),
                answer="B", year=None, exam="e", source="t")
    assert format_query(item, "enem") == ("Pergunta:\nQuanto é 2+2?\nAlternativas:\nA. 3\nB. 4\n"
                                          "Resposta correta:")
    context = build_context("legal", [item], item)
    assert context.startswith("As perguntas a seguir")
    assert "Resposta correta: B\n\nQuestão:\nQuanto" in context
    assert context.endswith("Resposta correta:")


@pytest.mark.parametrize("text,expected", [
    (" B", "B"), ("Resposta: C, porque", "C"), ("A alternativa correta é a letra D.", "D"),
    ("Letra E", "E"), ("nenhuma", INVALID), (" (b)", INVALID), ("Opção: A", "A"),
    # The Leaderboard's keyword pattern: only a word's first letter is case-insensitive, so
    # "LETRA B" falls through to the later patterns (here: the final bare "A").
    ("letra C", "C"), ("LETRA B, nao A", "A"), ("letra B, nao A", "B"), ("RESPOSTA:\n\tD", "D"), ("  e  ", INVALID),
    ("E", "E"), ("alternativa\ncorreta: B", "B"),
])
def test_extract_letter(text, expected):
    assert extract_letter(text, "ABCDE") == expected


def test_extract_letter_only_among_labels():
    assert extract_letter("E", "ABCD") == INVALID


def test_errors_for_bad_suite_options(monkeypatch):
    monkeypatch.delenv("BRMERGE_DATA_DIR", raising=False)
    assert resolve_data_dir(None) is None
    with pytest.raises(SuiteError, match="pass --data-dir DIR or set BRMERGE_DATA_DIR"):
        load_suite(split="dev", source="data")
    with pytest.raises(SuiteError, match="split='train'"):
        load_suite(split="train")
    with pytest.raises(SuiteError, match="unknown domain\\(s\\) healthbench for the sample suite"):
        load_suite(split="dev", domains=["healthbench"])
