"""The ``leaderboard`` suite: ENEM and OAB by the Open PT LLM Leaderboard's rules (OAB: its items).

Read from the Leaderboard's harness, eduagarcia/lm-evaluation-harness-pt @ ca07215
(``lm_eval/tasks/portuguese/enem.yaml`` and ``util.py``, ``lm_eval/tasks/oab_exams/default/``,
``lm_eval/api/samplers.py`` for ``id_sampler``, ``lm_eval/models/huggingface.py`` for the
budget and chat rendering) and its evaluation bot, eduagarcia/llm_leaderboard_eval_bot
(``tasks_config/pt_config.yaml``, ``evaluate_llms.py``, ``run_eval.py``).

- ``ptbr_oab_exams`` (their ``oab_exams``): every OAB exam of 2010-2018 minus the 15 ids of
  their ``id_list`` (``exclude_from_task: true``), the first 3 being the shots; annulled items
  are skipped. Same 2,195 items and ids as theirs (our data is the same transcription).
- ``ptbr_enem_challenge`` (their ``enem_challenge``): ENEM 2010-2018, 2022 and 2023 without
  the questions that need an image, as theirs. NOT the same items: their dataset
  (``eduagarcia/enem_challenge``, about 1,430 questions) comes from other transcriptions (the
  ENEM 2009-2017 dataset of ime.usp.br and maritaca-ai/enem for 2022/2023) that keep a
  question whose figure is decorative or described in text; ours (enem.dev's, English track)
  drops every item with an image, so it holds fewer per year (:data:`ENEM_LEADERBOARD_COUNT`
  against ``len(task.items)``; ``docs/evaluation.md`` has the table).
  Shots: their ``2022_21``, ``2022_88``, ``2022_143`` (another booklet's numbering) are the
  "Urgência emocional", Hannah Arendt and swimming-pool questions; they are found here by
  their text (:data:`ENEM_SHOTS`), not by id, and removed from scoring as theirs are.

Both tasks are ``generate_until`` scored by their letter extraction
(:mod:`benchmarks_ptbr.extract`); the generation budget depends on the Leaderboard's era
(:func:`budget`). Every item of ENEM 2010-2017 and OAB 2010-2014 is also in brmerge's ``dev``
split: a campaign searched on dev has seen them (``Task.dev_overlap`` counts them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks_ptbr.fewshot import DEFAULT_NUM_FEWSHOT, select_shots
from benchmarks_ptbr.items import SKIP_FEWSHOT, SKIP_OUTSIDE_SPLITS, Item, SuiteError
from benchmarks_ptbr.sources import Source, load_data_dir

LEADERBOARD = "leaderboard"  # the suite's source and split name
SKIP_EXCLUDED = "excluded_by_leaderboard"  # in the Leaderboard's exclude list, not a shot
_LANGUAGE_VARIANTS = ("_ingles", "_espanhol")  # id suffixes of ENEM's foreign-language items

# Their published size of enem_challenge (pt_config.yaml: "1,430 questions"); a run scores
# 1,430 minus the 3 shots (a published run reports 1,429).
ENEM_LEADERBOARD_COUNT = 1430
ENEM_YEARS = frozenset(range(2010, 2019)) | {2022, 2023}  # pt_config.yaml's description

# Eras of the Leaderboard's runs (bot: run_eval.py adds starting_max_length=2560; from 2025-04
# evaluate_llms.py adds max_gen_toks=1536, which HFLM adds to starting_max_length).
ERAS = ("2024", "2025")
DEFAULT_ERA = "2025"  # the current runs
_START_LENGTH = 2560       # run_eval.py: starting_max_length
_ERA_GEN_TOKS = {"2024": None, "2025": 1536}  # model-level max_gen_toks (None: the task's)
_TASK_GEN_TOKS = 32        # enem.yaml (until 2025-02) and oab_exams.yaml: max_gen_toks
_SHORT_MODEL_RESERVE = 2048  # HFLM.generate_until: max(32, max_length - 2048) below the start


@dataclass(frozen=True)
class Shot:
    leaderboard_id: str  # their id (another booklet's numbering for ENEM)
    marker: str          # text that identifies the question in any transcription
    answer: str


ENEM_SHOT_YEAR = 2022  # their id_list's exam
# The shots of their id_list heads, identified by content (answers from the official key).
ENEM_SHOTS = (Shot("2022_21", "Urgência emocional", "E"),
              Shot("2022_88", "Arendt", "E"),
              Shot("2022_143", "piscina", "B"))


@dataclass(frozen=True)
class LeaderboardTask:
    name: str                     # our lm-eval task name
    leaderboard_name: str         # the Leaderboard's task name
    domain: str
    scored: Source                # folder and the years scored (``dev_years`` of this table)
    id_list: tuple[str, ...]      # their id_sampler list (OAB: the same ids in our data)
    shots_by_content: tuple[Shot, ...]  # ENEM: their id_list, found by text
    description: str
    baseline: float               # pt_config.yaml's random baseline, for the normalized score

    @property
    def max_gen_toks(self) -> int:
        """The budget written into the stock lm-eval YAML (see LEADERBOARD_MAX_GEN_TOKS)."""
        return LEADERBOARD_MAX_GEN_TOKS


_OAB_IDS = ("2010-01_1", "2010-01_11", "2010-01_13", "2010-01_23", "2010-01_26", "2010-01_28",
            "2010-01_38", "2010-01_48", "2010-01_58", "2010-01_68", "2010-01_76", "2010-01_83",
            "2010-01_85", "2010-01_91", "2010-01_99")

LEADERBOARD_TASKS: dict[str, LeaderboardTask] = {
    "enem": LeaderboardTask(
        name="ptbr_enem_challenge", leaderboard_name="enem_challenge", domain="enem",
        scored=Source("enem_dev", "enem", ENEM_YEARS), id_list=(), shots_by_content=ENEM_SHOTS,
        description="As perguntas a seguir são questões de múltipla escolha do Exame Nacional "
                    "do Ensino Médio (ENEM), selecione a única alternativa correta e responda "
                    "apenas com as letras \"A\", \"B\", \"C\", \"D\" ou \"E\".\n\n",
        baseline=0.20),
    "legal": LeaderboardTask(
        name="ptbr_oab_exams", leaderboard_name="oab_exams", domain="legal",
        scored=Source("oab_exams", "legal", frozenset(range(2010, 2019)), exam_field="exam_id"),
        id_list=_OAB_IDS, shots_by_content=(),
        description="As perguntas a seguir são questões de múltipla escolha do Exame de Ordem "
                    "da Ordem dos Advogados do Brasil (OAB), selecione a única alternativa "
                    "correta e responda apenas com as letras \"A\", \"B\", \"C\" ou \"D\".\n\n",
        baseline=0.25),
}
LEADERBOARD_DOMAINS = tuple(LEADERBOARD_TASKS)


@dataclass(frozen=True)
class Budget:
    max_length: int    # HFLM's max_length after its start cap
    max_gen_toks: int  # new tokens generated (no stop criterion: cut at "\n\n" afterwards)

    @property
    def max_ctx_len(self) -> int:
        """The context cap: shots are dropped (then the left truncated) above it."""
        return self.max_length - self.max_gen_toks


def budget(era: str, model_max_length: int) -> Budget:
    """The generation budget of the Leaderboard's runs of ``era`` for a model whose HFLM
    ``max_length`` (config or tokenizer) is ``model_max_length``, assuming no OOM (the harness
    lowers max_length when a batch does not fit; we never do)."""
    if era not in ERAS:
        raise SuiteError(f"--leaderboard-era {era}: choose from {', '.join(ERAS)}")
    model_gen = _ERA_GEN_TOKS[era]
    start = _START_LENGTH + (model_gen or 0)  # HFLM.__init__: starting_max_length += max_gen_toks
    max_length = min(model_max_length, start)
    if model_gen is None:  # 2024: the task's max_gen_toks (32 for both tasks then)
        return Budget(max_length, _TASK_GEN_TOKS)
    if max_length < start:  # 2025 on a shorter model: HFLM shrinks the generation budget
        return Budget(max_length, max(32, max_length - _SHORT_MODEL_RESERVE))
    return Budget(max_length, model_gen)


# lm-eval's stock YAML cannot express the model-level budget: it gets the current era's
# budget for a model of at least 4096 tokens.
LEADERBOARD_MAX_GEN_TOKS = budget(DEFAULT_ERA, 1 << 20).max_gen_toks


def normalized(acc: float, domain: str) -> float:
    """The Leaderboard's displayed score: (acc - baseline) / (1 - baseline)."""
    base = LEADERBOARD_TASKS[domain].baseline
    return (acc - base) / (1.0 - base)


def item_set_notes(n_available: dict[str, int]) -> list[str]:
    """One line per task whose item set is not the Leaderboard's (ENEM), for the report."""
    name = LEADERBOARD_TASKS["enem"].name
    if name not in n_available:
        return []
    theirs = ENEM_LEADERBOARD_COUNT - len(ENEM_SHOTS)
    return [f"{name}: {n_available[name]} items (enem.dev's transcription of ENEM 2010-2018, "
            f"2022, 2023, without image items); the Leaderboard scores about {theirs} from "
            "another transcription of the same years: not the same item set, so its accuracy "
            "is not directly comparable"]


def shots_by_content(pool: Sequence[Item], specs: Sequence[Shot]) -> list[Item]:
    """The item of ``pool`` whose question contains each spec's marker (exactly one each)."""
    shots = []
    for spec in specs:
        found = [i for i in pool if spec.marker in i.question]
        if len(found) != 1:
            raise SuiteError(f"the Leaderboard's ENEM shot {spec.leaderboard_id} ({spec.marker!r}) "
                             f"matches {len(found)} items of the data directory, not 1; check "
                             "the ENEM 2022 items of --data-dir")
        if found[0].answer != spec.answer:
            raise SuiteError(f"the Leaderboard's ENEM shot {spec.leaderboard_id} is "
                             f"{found[0].id} with key {found[0].answer}, not {spec.answer}; "
                             "check the ENEM 2022 items of --data-dir")
        shots.append(found[0])
    return shots


def load_leaderboard(*, data_dir: Path, domains: Sequence[str] | None = None,
                     limit: int | None = None, num_fewshot: int = DEFAULT_NUM_FEWSHOT):
    """The leaderboard suite from a data directory (see the module docstring)."""
    from benchmarks_ptbr.suite import Suite, Task, positions, stratified_limit

    domains = tuple(domains) if domains else LEADERBOARD_DOMAINS
    unknown = [d for d in domains if d not in LEADERBOARD_TASKS]
    if unknown:
        raise SuiteError(f"the leaderboard suite has no {', '.join(unknown)} domain; "
                         f"choose from {', '.join(LEADERBOARD_DOMAINS)}")
    tasks = []
    for domain in domains:
        spec = LEADERBOARD_TASKS[domain]
        loaded = load_data_dir(domain, data_dir, sources=(spec.scored,))
        candidates = loaded.items["dev"]
        if spec.shots_by_content:
            pool = [i for i in candidates
                    if i.year == ENEM_SHOT_YEAR and not i.id.endswith(_LANGUAGE_VARIANTS)]
            listed = shots_by_content(pool, spec.shots_by_content)
        else:
            listed = select_shots(candidates, preferred=spec.id_list, k=len(spec.id_list))
        # id_sampler takes the first k of its list; exclude_from_task removes the whole list.
        shots = listed[:max(num_fewshot, 0)]
        excluded = {s.id for s in listed}
        scorable = [i for i in candidates if i.id not in excluded]
        skipped = {k: v for k, v in loaded.skipped["dev"].items() if k != SKIP_OUTSIDE_SPLITS}
        in_pool = {i.id for i in candidates}
        shot_ids = {s.id for s in shots}
        if shot_ids & in_pool:
            skipped[SKIP_FEWSHOT] = len(shot_ids & in_pool)
        if (excluded - shot_ids) & in_pool:
            skipped[SKIP_EXCLUDED] = len((excluded - shot_ids) & in_pool)
        dev_ids = {i.id for i in load_data_dir(domain, data_dir).items["dev"]}
        kept = stratified_limit(scorable, limit)
        tasks.append(Task(
            name=spec.name, domain=domain, split=LEADERBOARD, source=LEADERBOARD,
            shots=tuple(shots), items=kept, skipped=skipped, n_available=len(scorable),
            prompt=spec.description, max_gen_toks=LEADERBOARD_MAX_GEN_TOKS,
            dev_overlap=sum(i.id in dev_ids for i in kept), indices=positions(scorable, kept)))
    return Suite(source=LEADERBOARD, split=LEADERBOARD, tasks=tuple(tasks), limit=limit,
                 num_fewshot=num_fewshot, data_dir=Path(data_dir))
