"""Few-shot examples: fixed, documented, always drawn from dev, never scored.

Like the Open Portuguese LLM Leaderboard we use 3 fixed examples per task. The Leaderboard's
ENEM shots are from 2022, which is in our *test* split, so ENEM uses three dev items instead.
The same shots serve the dev and the test task of a domain; on dev they (and their
HealthBench-BR true/false twins) are removed from the scored items.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from benchmarks_ptbr.items import Item

DEFAULT_NUM_FEWSHOT = 3  # as the Leaderboard does; a default in one place

FEWSHOT_IDS: dict[str, tuple[str, ...]] = {
    # The Leaderboard's OAB shots (exam 2010-01, in our dev years).
    "legal": ("2010-01_1", "2010-01_11", "2010-01_13"),
    # Revalida 2021.01 (SUS policy), Teste de Progresso 2013, Revalida 2017.01.
    "health": ("revalida_2021.01_47", "tp_2013_interinstitucional_93", "revalida_2017.01_49"),
    # ENEM 2019 humanities, 2019 natural sciences, 2020 languages (all text-only, dev years).
    "enem": ("enem_2019_51", "enem_2019_92", "enem_2020_36"),
    # One true/false pair and one true statement of a dev protocol (Porfirias).
    "healthbench": ("hbbr_001_00", "hbbr_001_01", "hbbr_001_02"),
}

# The shipped sample suite: the first three dev questions of each domain file.
SAMPLE_FEWSHOT_IDS: dict[str, tuple[str, ...]] = {
    "legal": ("sample_legal_01", "sample_legal_02", "sample_legal_03"),
    "health": ("sample_health_01", "sample_health_02", "sample_health_03"),
    "enem": ("sample_enem_01", "sample_enem_02", "sample_enem_03"),
}


def _stable_key(item: Item) -> str:
    return hashlib.sha256(item.id.encode()).hexdigest()


def select_shots(dev_items: Sequence[Item], *, preferred: Sequence[str], k: int) -> list[Item]:
    """The ``preferred`` ids that exist in dev, in order; then a fixed fallback.

    The fallback (for data whose ids differ, e.g. a hub mirror) takes dev items in the order
    of a hash of their id: fixed for given data, and independent of file order.
    """
    if k <= 0:
        return []
    by_id = {item.id: item for item in dev_items}
    shots = [by_id[i] for i in preferred if i in by_id][:k]
    if len(shots) < k:
        chosen = {s.id for s in shots}
        rest = sorted((i for i in dev_items if i.id not in chosen), key=_stable_key)
        shots += rest[: k - len(shots)]
    return shots


def excluded_ids(shots: Sequence[Item], dev_items: Sequence[Item]) -> set[str]:
    """Ids not to score on dev: the shots and their true/false twins (same ``pair``)."""
    pairs = {s.pair for s in shots if s.pair}
    return {s.id for s in shots} | {i.id for i in dev_items if i.pair and i.pair in pairs}
