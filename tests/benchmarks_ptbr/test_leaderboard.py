"""The leaderboard suite against the Open PT LLM Leaderboard's task definitions.

The expected strings and ids below were read from eduagarcia/lm-evaluation-harness-pt
@ ca07215 (``lm_eval/tasks/portuguese/enem.yaml``, ``lm_eval/tasks/oab_exams/default/``);
docs/evaluation.md says how.
"""

from __future__ import annotations

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


def _theirs(header: str, item) -> str:
    # Their util.doc_to_text / enem_doc_to_text: options "A. text" joined by newlines.
    options = "\n".join(f"{lab}. {txt}" for lab, txt in zip(item.labels, item.texts)).strip()
    return f"{header}\n{item.question}\nAlternativas:\n{options}\nResposta correta:"


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
    # Every 2010-2014 item is in brmerge's dev split too.
    assert task.dev_overlap == sum(i.year <= 2014 for i in task.items) == 1334 - 15
    assert task.max_gen_toks == 32 and task.description == OAB_DESCRIPTION
    item = task.items[0]
    expected = OAB_DESCRIPTION + "".join(_theirs("Questão:", s) + f" {s.answer}\n\n"
                                         for s in task.shots) + _theirs("Questão:", item)
    assert task.context(item) == expected


def test_enem_challenge_items_shots_and_prompt(data_dir):
    suite = load_suite(split="leaderboard", source="leaderboard", data_dir=data_dir,
                       domains=["enem"])
    task = suite.task("ptbr_enem_challenge")
    dev = load_suite(split="dev", source="data", data_dir=data_dir, domains=["enem"],
                     num_fewshot=0).task("ptbr_enem_dev")
    # ENEM 2009-2017 = the dev split's items of those years (same loader, same skips).
    assert [i.id for i in task.items] == [i.id for i in dev.items if i.year <= 2017]
    assert len(task.items) == 925 and task.dev_overlap == 925
    assert {i.year for i in task.items} == set(range(2009, 2018))
    # Their shots 2022_21, 2022_88, 2022_143; 143 has image-only options in enem.dev.
    shots = [s.id for s in task.shots]
    assert shots[:2] == ["enem_2022_21", "enem_2022_88"] and "enem_2022_143" not in shots
    assert all(s.year == 2022 and "_" not in s.id[len("enem_2022_"):] for s in task.shots)
    assert task.skipped["missing_context"] == 55 and "fewshot" not in task.skipped
    assert task.max_gen_toks == 256 and task.description == ENEM_DESCRIPTION
    item = task.items[0]
    assert task.context(item).endswith("\n\n" + _theirs("Pergunta:", item))
    assert task.context(item).startswith(ENEM_DESCRIPTION + _theirs("Pergunta:", task.shots[0])
                                         + f" {task.shots[0].answer}\n\n")


def test_leaderboard_yaml_is_generation_with_their_budget():
    oab = (TASKS_DIR / "ptbr_oab_exams.yaml").read_text(encoding="utf-8")
    enem = (TASKS_DIR / "ptbr_enem_challenge.yaml").read_text(encoding="utf-8")
    group = (TASKS_DIR / "_ptbr_leaderboard.yaml").read_text(encoding="utf-8")
    for text, budget in ((oab, 32), (enem, 256)):
        assert "output_type: generate_until" in text and f"max_gen_toks: {budget}" in text
        assert "source: leaderboard" in text and 'until: ["\\n\\n"]' in text
    assert "  - ptbr_enem_challenge\n  - ptbr_oab_exams" in group
