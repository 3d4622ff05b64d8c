"""The leaderboard suite against the Open PT LLM Leaderboard's own definitions.

The spec strings, ids, regexes and rules below are written down from the Leaderboard's
sources, not from brmerge's: eduagarcia/lm-evaluation-harness-pt @ ca07215
(``lm_eval/tasks/portuguese/enem.yaml`` and ``util.py``, ``lm_eval/tasks/oab_exams/default/
oab_exams.yaml`` and ``util.py``, ``lm_eval/filters/{decontamination,extraction,custom}.py``,
``lm_eval/models/huggingface.py``) and eduagarcia/llm_leaderboard_eval_bot
(``tasks_config/pt_config.yaml``, ``run_eval.py``, ``evaluate_llms.py``).
"""

from __future__ import annotations

import json
import re
import unicodedata

import pytest

from benchmarks_ptbr import leaderboard
from benchmarks_ptbr.extract import INVALID, clean_generation, extract_letter, transliterate
from benchmarks_ptbr.items import SuiteError
from benchmarks_ptbr.lm_eval_tasks import TASKS_DIR
from benchmarks_ptbr.suite import load_suite

OAB_DESCRIPTION = ("As perguntas a seguir são questões de múltipla escolha do Exame de Ordem da "
                   "Ordem dos Advogados do Brasil (OAB), selecione a única alternativa correta e "
                   "responda apenas com as letras \"A\", \"B\", \"C\" ou \"D\".\n\n")
ENEM_DESCRIPTION = ("As perguntas a seguir são questões de múltipla escolha do Exame Nacional do "
                    "Ensino Médio (ENEM), selecione a única alternativa correta e responda apenas "
                    "com as letras \"A\", \"B\", \"C\", \"D\" ou \"E\".\n\n")
OAB_ID_LIST = ["2010-01_1", "2010-01_11", "2010-01_13", "2010-01_23", "2010-01_26", "2010-01_28",
               "2010-01_38", "2010-01_48", "2010-01_58", "2010-01_68", "2010-01_76", "2010-01_83",
               "2010-01_85", "2010-01_91", "2010-01_99"]
# pt_config.yaml: "1,430 questions that don't require image understanding of the exams from
# 2010 to 2018, 2022 and 2023"; baselines 20.0 (ENEM) and 25.0 (OAB).
THEIR_ENEM_YEARS = set(range(2010, 2019)) | {2022, 2023}
THEIR_ENEM_COUNT = 1430
# enem.yaml id_list ["2022_21", "2022_88", "2022_143"]: their questions, by text and key.
THEIR_ENEM_SHOTS = [("Urgência emocional", "E"), ("Hannah Arendt", "E"),
                    ("piscina com o formato de um paralelepípedo", "B")]
# find_choices regex_patterns of enem.yaml (OAB: the same with [ABCD]).
THEIR_PATTERNS = [
    "(?:[Ll]etra|[Aa]lternativa|[Rr]esposta|[Rr]esposta [Cc]orreta|[Rr]esposta [Cc]orreta e|[Oo]pcao):? ([ABCDE])\\b",
    "\\b([ABCDE])\\.",
    "\\b([ABCDE]) ?[.):-]",
    "\\b([ABCDE])$",
    "\\b([ABCDE])\\b",
]


def _theirs(header: str, item) -> str:
    # util.doc_to_text / enem_doc_to_text: "label. text\n" per option, the whole stripped.
    options = "".join(f"{lab}. {txt}\n" for lab, txt in zip(item.labels, item.texts)).strip()
    return f"{header}\n{item.question}\nAlternativas:\n{options}\nResposta correta:"


def _their_filters(text: str, patterns=THEIR_PATTERNS, choices="ABCDE") -> str:
    unidecode = pytest.importorskip("unidecode").unidecode
    text = text.replace("\n", " ").replace("\r", " ").replace("\t", " ")  # normalize_spaces
    text = re.sub(" +", " ", text).strip()
    text = unidecode(text).strip()                                          # remove_accents
    if text in choices:                                                     # find_choices
        return text
    for regex in patterns:
        match = re.search(re.compile(regex), text)
        if match:
            return match.group(1)
    return "[invalid]"


def test_oab_exams_items_shots_and_prompt(data_dir):
    suite = load_suite(split="leaderboard", source="leaderboard", data_dir=data_dir,
                       domains=["legal"])
    task = suite.task("ptbr_oab_exams")
    # SOURCES.md: 2220 OAB items 2010-2018, 10 annulled; minus their 15 listed ids.
    assert len(task.items) == 2220 - 10 - 15 == 2195
    assert task.skipped == {"annulled": 10, "fewshot": 3, "excluded_by_leaderboard": 12}
    assert not {i.id for i in task.items} & set(OAB_ID_LIST)
    assert {i.year for i in task.items} == set(range(2010, 2019))
    assert [s.id for s in task.shots] == OAB_ID_LIST[:3]
    assert task.dev_overlap == sum(i.year <= 2014 for i in task.items) == 1334 - 15
    assert task.description == OAB_DESCRIPTION
    for item in task.items:
        expected = OAB_DESCRIPTION + "".join(_theirs("Questão:", s) + f" {s.answer}\n\n"
                                             for s in task.shots) + _theirs("Questão:", item)
        assert task.context(item) == expected


def _their_enem_rows(data_dir):
    # Our data's rows of their years that need no image, English track, not marked unusable.
    path = data_dir / "enem_dev" / "derived" / "enem_2009_2023.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if r["year"] in THEIR_ENEM_YEARS and r["usable_text_only"]
            and r.get("language") != "espanhol" and r.get("problem") is None]


def test_enem_challenge_years_shots_by_text_and_prompt(data_dir):
    suite = load_suite(split="leaderboard", source="leaderboard", data_dir=data_dir,
                       domains=["enem"])
    task = suite.task("ptbr_enem_challenge")
    shots = list(task.shots)
    for shot, (text, answer) in zip(shots, THEIR_ENEM_SHOTS, strict=True):
        assert text in shot.question and shot.answer == answer and shot.year == 2022
    # SOURCES.md's ids for them, and not the look-alike ids of their numbering.
    assert [s.id for s in shots] == ["enem_2022_6", "enem_2022_47", "enem_2022_172"]
    rows = _their_enem_rows(data_dir)
    assert {i.year for i in task.items} == THEIR_ENEM_YEARS
    assert [i.id for i in task.items] == [r["id"] for r in rows if r["id"] not in
                                          {s.id for s in shots}]
    assert task.skipped["fewshot"] == 3
    # Not their item set: another transcription that keeps more questions.
    print(f"ptbr_enem_challenge: {len(task.items)} items; the Leaderboard: "
          f"{THEIR_ENEM_COUNT - 3}")
    assert len(task.items) == 1138 < THEIR_ENEM_COUNT - 3
    assert leaderboard.ENEM_LEADERBOARD_COUNT == THEIR_ENEM_COUNT
    note = leaderboard.item_set_notes({"ptbr_enem_challenge": len(task.items)})
    assert len(note) == 1 and "not the same item set" in note[0] and "1427" in note[0]
    assert task.description == ENEM_DESCRIPTION
    for item in task.items:
        assert task.context(item) == ENEM_DESCRIPTION + "".join(
            _theirs("Pergunta:", s) + f" {s.answer}\n\n" for s in shots) + _theirs("Pergunta:", item)


def test_enem_shots_by_text_fail_loudly_when_missing(data_dir):
    pool = load_suite(split="leaderboard", source="leaderboard", data_dir=data_dir,
                      domains=["enem"]).task("ptbr_enem_challenge").items
    with pytest.raises(SuiteError, match="2022_21 .* matches 0 items"):
        leaderboard.shots_by_content(pool, leaderboard.ENEM_SHOTS)


def test_num_fewshot_takes_the_head_of_their_list_and_excludes_all_of_it(data_dir):
    suite = load_suite(split="leaderboard", source="leaderboard", data_dir=data_dir,
                       num_fewshot=1)
    enem, oab = suite.task("ptbr_enem_challenge"), suite.task("ptbr_oab_exams")
    assert [s.id for s in enem.shots] == ["enem_2022_6"] and len(enem.items) == 1138
    assert [s.id for s in oab.shots] == OAB_ID_LIST[:1] and len(oab.items) == 2195


# HFLM (huggingface.py @ ca07215, and @ 885a45d for 2024) with the bot's model_args:
# era -> model max length -> (max_length, max_gen_toks).
@pytest.mark.parametrize("era, model_max, expected", [
    ("2024", 32768, (2560, 32)),   # starting_max_length=2560, the tasks' max_gen_toks: 32
    ("2024", 2048, (2048, 32)),
    ("2025", 32768, (4096, 1536)),  # starting_max_length 2560 + max_gen_toks 1536
    ("2025", 4096, (4096, 1536)),
    ("2025", 3000, (3000, 952)),   # below the start: max(32, max_length - 2048)
    ("2025", 2048, (2048, 32)),
])
def test_budget_follows_the_harness(era, model_max, expected):
    plan = leaderboard.budget(era, model_max)
    assert (plan.max_length, plan.max_gen_toks) == expected
    assert plan.max_ctx_len == expected[0] - expected[1]


def test_unknown_era_is_a_user_error():
    with pytest.raises(SuiteError, match="--leaderboard-era 2023: choose from 2024, 2025"):
        leaderboard.budget("2023", 4096)


def test_normalized_scores_use_their_baselines():
    assert leaderboard.normalized(0.6, "enem") == pytest.approx((0.6 - 0.20) / 0.80)
    assert leaderboard.normalized(0.25, "legal") == pytest.approx(0.0)
    assert leaderboard.normalized(1.0, "legal") == pytest.approx(1.0)


def test_leaderboard_yaml_is_generation_with_the_current_budget():
    oab = (TASKS_DIR / "ptbr_oab_exams.yaml").read_text(encoding="utf-8")
    enem = (TASKS_DIR / "ptbr_enem_challenge.yaml").read_text(encoding="utf-8")
    group = (TASKS_DIR / "_ptbr_leaderboard.yaml").read_text(encoding="utf-8")
    for text in (oab, enem):
        assert "output_type: generate_until" in text and "max_gen_toks: 1536" in text
        assert "source: leaderboard" in text and 'until: ["\\n\\n"]' in text
    assert "  - ptbr_enem_challenge\n  - ptbr_oab_exams" in group


# huggingface.py generate_until: s[rfind('</think>') + 8:].strip(), then split at each `until`.
@pytest.mark.parametrize("raw, expected", [
    ("<think>hmm\n\nA or B</think>\n\nResposta: B\n\nmore", "Resposta: B"),
    ("a</think>b</think>  C) sim", "C) sim"),
    ("Letra D\n\nPergunta:", "Letra D"),
    ("no think here", "no think here"),
])
def test_clean_generation_removes_reasoning_then_cuts(raw, expected):
    assert clean_generation(raw) == expected
    assert clean_generation(raw, strip_think=False) == raw.split("\n\n")[0]


OUTPUTS = [
    "B — C) é falsa", "A", " E ", "Letra C", "letra d.", "LETRA B", "Resposta correta: E",
    "Opção A", "alternativa (B)", "A resposta é C.", "Β", "Ｃ", "É a D", "ação", "", "  ",
    "Resposta: Ｂ", "—E— ", "C–D", "« D »", "x ÷ A", "Alternativa\u00a0C", "Ⓐ", "1º B",
    "Pergunta:\nAlternativas:\nA. um\nB. dois", "letra\tb", "a) b) c)", "E\u0301 C",
]


@pytest.mark.parametrize("text", OUTPUTS)
def test_extraction_equals_their_filter_chain(text):
    assert extract_letter(text, "ABCDE") == _their_filters(text)
    oab = [p.replace("ABCDE", "ABCD") for p in THEIR_PATTERNS]
    assert extract_letter(text, "ABCD") == _their_filters(text, oab, "ABCD")


def test_the_example_that_unicode_decomposition_got_wrong():
    assert extract_letter("B — C) é falsa", "ABCDE") == "B"
    assert extract_letter("nada", "ABCD") == INVALID


def test_transliteration_equals_unidecode_on_the_data_and_tabled_blocks(data_dir):
    unidecode = pytest.importorskip("unidecode").unidecode
    blocks = [(0x80, 0x180), (0x2010, 0x2040), (0x386, 0x3cf), (0x410, 0x450)]
    chars = {chr(c) for lo, hi in blocks for c in range(lo, hi)
             if unicodedata.category(chr(c)) != "Cn"}  # every assigned character
    for path in (data_dir / "enem_dev" / "derived" / "enem_2009_2023.jsonl",
                 data_dir / "oab_exams" / "derived" / "oab_exams_2010_2018.jsonl"):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            chars |= set(row["question"] + "".join(c["text"] for c in row["choices"]))
    wrong = {c: (transliterate(c), unidecode(c)) for c in chars
             if transliterate(c) != unidecode(c)}
    assert not wrong and len(chars) > 400
