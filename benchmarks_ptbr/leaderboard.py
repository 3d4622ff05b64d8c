"""The ``leaderboard`` suite: ENEM and OAB as the Open Portuguese LLM Leaderboard scores them.

Checked against the Leaderboard's harness, eduagarcia/lm-evaluation-harness-pt @ ca07215
(``lm_eval/tasks/portuguese/enem.yaml``, ``lm_eval/tasks/oab_exams/default/oab_exams.yaml``
and their ``util.py``; ``lm_eval/api/samplers.py`` for ``id_sampler``): the descriptions and
prompts below are theirs character for character, the shots are their ``id_list`` heads, the
ids they exclude from scoring are theirs, and both tasks are ``generate_until`` scored by
their letter extraction (:mod:`benchmarks_ptbr.extract`). Their datasets are Hugging Face
copies (``eduagarcia/enem_challenge``, ``eduagarcia/oab_exams``); we read the same exams from
the data directory, so the ENEM transcription is enem.dev's, not theirs.

- ``ptbr_enem_challenge`` (their ``enem_challenge``): ENEM 2009-2017 (the English track of
  questions 1-5; items that need an image, or that the data's review marks, are skipped and
  counted). Shots ``2022_21``, ``2022_88``, ``2022_143``; in our data ``enem_2022_143`` has
  image-only options, so its place goes to the first usable Portuguese 2022 item in
  SHA-256-of-id order.
  Generation budget: lm-eval's default of 256 tokens (their YAML sets none).
- ``ptbr_oab_exams`` (their ``oab_exams``): every OAB exam of 2010-2018 minus the 15 ids of
  their ``id_list`` (``exclude_from_task: true``), the first 3 being the shots; annulled items
  are skipped. 32 tokens, as theirs.

Every item of ENEM 2009-2017 and of OAB 2010-2014 is also in brmerge's ``dev`` split: a
campaign searched on dev has seen them, so its leaderboard score is optimistic on them.
Each task reports how many of its items overlap dev (``Task.dev_overlap``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks_ptbr.fewshot import DEFAULT_NUM_FEWSHOT, select_shots
from benchmarks_ptbr.items import SKIP_FEWSHOT, SKIP_OUTSIDE_SPLITS, SuiteError
from benchmarks_ptbr.sources import Source, load_data_dir

LEADERBOARD = "leaderboard"  # the suite's source and split name
SKIP_EXCLUDED = "excluded_by_leaderboard"  # in the Leaderboard's exclude list, not a shot
_LANGUAGE_VARIANTS = ("_ingles", "_espanhol")  # id suffixes of ENEM's foreign-language items
LEADERBOARD_MAX_GEN_TOKS = 256  # lm-eval HFLM's default max_gen_toks (enem.yaml sets none)


@dataclass(frozen=True)
class LeaderboardTask:
    name: str                     # our lm-eval task name
    leaderboard_name: str         # the Leaderboard's task name
    domain: str
    scored: Source                # folder and the years scored (``dev_years`` of this table)
    shot_years: frozenset[int]    # where the shots live (may be outside the scored years)
    shot_ids: tuple[str, ...]
    excluded_ids: tuple[str, ...]  # removed from scoring (their ``exclude_from_task``)
    description: str
    max_gen_toks: int


_OAB_IDS = ("2010-01_1", "2010-01_11", "2010-01_13", "2010-01_23", "2010-01_26", "2010-01_28",
            "2010-01_38", "2010-01_48", "2010-01_58", "2010-01_68", "2010-01_76", "2010-01_83",
            "2010-01_85", "2010-01_91", "2010-01_99")
_ENEM_IDS = ("enem_2022_21", "enem_2022_88", "enem_2022_143")  # their 2022_21, 2022_88, 2022_143

LEADERBOARD_TASKS: dict[str, LeaderboardTask] = {
    "enem": LeaderboardTask(
        name="ptbr_enem_challenge", leaderboard_name="enem_challenge", domain="enem",
        scored=Source("enem_dev", "enem", frozenset(range(2009, 2018)), frozenset({2022})),
        shot_years=frozenset({2022}), shot_ids=_ENEM_IDS, excluded_ids=_ENEM_IDS,
        description="As perguntas a seguir são questões de múltipla escolha do Exame Nacional "
                    "do Ensino Médio (ENEM), selecione a única alternativa correta e responda "
                    "apenas com as letras \"A\", \"B\", \"C\", \"D\" ou \"E\".\n\n",
        max_gen_toks=LEADERBOARD_MAX_GEN_TOKS),
    "legal": LeaderboardTask(
        name="ptbr_oab_exams", leaderboard_name="oab_exams", domain="legal",
        scored=Source("oab_exams", "legal", frozenset(range(2010, 2019)), exam_field="exam_id"),
        shot_years=frozenset(range(2010, 2019)), shot_ids=_OAB_IDS[:3], excluded_ids=_OAB_IDS,
        description="As perguntas a seguir são questões de múltipla escolha do Exame de Ordem "
                    "da Ordem dos Advogados do Brasil (OAB), selecione a única alternativa "
                    "correta e responda apenas com as letras \"A\", \"B\", \"C\" ou \"D\".\n\n",
        max_gen_toks=32),
}
LEADERBOARD_DOMAINS = tuple(LEADERBOARD_TASKS)


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
        # One split table for the task: "dev" holds the scored years, "test" the shot years.
        table = Source(spec.scored.name, domain, spec.scored.dev_years,
                       spec.shot_years - spec.scored.dev_years, exam_field=spec.scored.exam_field)
        loaded = load_data_dir(domain, data_dir, sources=(table,))
        # Fallback shots are Portuguese questions: not the English/Spanish variants of 1-5.
        pool = [i for i in loaded.items["dev"] + loaded.items["test"]
                if i.year in spec.shot_years and not i.id.endswith(_LANGUAGE_VARIANTS)]
        shots = select_shots(pool, preferred=spec.shot_ids, k=num_fewshot)
        shot_ids = {s.id for s in shots}
        excluded = set(spec.excluded_ids) | shot_ids
        candidates = loaded.items["dev"]
        scorable = [i for i in candidates if i.id not in excluded]
        skipped = {k: v for k, v in loaded.skipped["dev"].items() if k != SKIP_OUTSIDE_SPLITS}
        in_pool = {i.id for i in candidates}
        if shot_ids & in_pool:
            skipped[SKIP_FEWSHOT] = len(shot_ids & in_pool)
        if (set(spec.excluded_ids) - shot_ids) & in_pool:
            skipped[SKIP_EXCLUDED] = len((set(spec.excluded_ids) - shot_ids) & in_pool)
        dev_ids = {i.id for i in load_data_dir(domain, data_dir).items["dev"]}
        kept = stratified_limit(scorable, limit)
        tasks.append(Task(
            name=spec.name, domain=domain, split=LEADERBOARD, source=LEADERBOARD,
            shots=tuple(shots), items=kept, skipped=skipped, n_available=len(scorable),
            prompt=spec.description, max_gen_toks=spec.max_gen_toks,
            dev_overlap=sum(i.id in dev_ids for i in kept), indices=positions(scorable, kept)))
    return Suite(source=LEADERBOARD, split=LEADERBOARD, tasks=tuple(tasks), limit=limit,
                 num_fewshot=num_fewshot, data_dir=Path(data_dir))
