"""Suites: the tasks of one split, each with its scored items, shots and skip counts."""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks_ptbr.fewshot import (
    DEFAULT_NUM_FEWSHOT,
    FEWSHOT_IDS,
    SAMPLE_FEWSHOT_IDS,
    excluded_ids,
    select_shots,
)
from benchmarks_ptbr.items import SKIP_FEWSHOT, Item, SuiteError
from benchmarks_ptbr.prompts import DESCRIPTIONS, GEN_MAX_TOKENS, build_context, build_messages
from benchmarks_ptbr.sources import (
    DOMAINS,
    SAMPLE_DOMAINS,
    SPLITS,
    DomainItems,
    load_data_dir,
    load_sample,
)

DATA_DIR_ENV = "BRMERGE_DATA_DIR"
SOURCES = ("sample", "data", "hub", "leaderboard")


def task_name(domain: str, split: str, *, source: str = "data", gen: bool = False) -> str:
    """``ptbr_legal_dev``; the sample suite is ``ptbr_sample_legal_dev``; ``_gen`` for generation."""
    prefix = "ptbr_sample_" if source == "sample" else "ptbr_"
    return f"{prefix}{domain}_{split}{'_gen' if gen else ''}"


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The flag wins, then ``$BRMERGE_DATA_DIR``; ``None`` when neither is set."""
    if data_dir:
        return Path(data_dir).expanduser().resolve()
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser().resolve() if env else None


@dataclass(frozen=True)
class Task:
    """One domain and split: the scored items (after ``limit``), the shots, the skip counts."""

    name: str
    domain: str
    split: str
    source: str
    shots: tuple[Item, ...]
    items: tuple[Item, ...]
    skipped: dict[str, int]
    n_available: int  # scorable items before ``limit``
    prompt: str | None = None  # task description; None: the domain's (prompts.DESCRIPTIONS)
    max_gen_toks: int = GEN_MAX_TOKENS  # generation budget of the task's ``_gen`` form
    dev_overlap: int = 0  # scored items that are also in the dev split (leaderboard suite)
    indices: tuple[int, ...] = ()  # positions of ``items`` among the task's items before limit

    @property
    def chance(self) -> float:
        """Expected accuracy of a uniform random guess over each item's options."""
        return sum(1 / len(i.labels) for i in self.items) / max(len(self.items), 1)

    def context(self, item: Item) -> str:
        """The plain-text prompt (no chat template), as the lm-eval task renders it."""
        return build_context(self.domain, self.shots, item, description=self.prompt)

    def messages(self, item: Item) -> list[dict[str, str]]:
        """The prompt as chat turns (system, shots as user/assistant turns, question)."""
        return build_messages(self.domain, self.shots, item, description=self.prompt)

    @property
    def description(self) -> str:
        return DESCRIPTIONS[self.domain] if self.prompt is None else self.prompt


@dataclass(frozen=True)
class Suite:
    source: str
    split: str
    tasks: tuple[Task, ...]
    limit: int | None = None
    num_fewshot: int = DEFAULT_NUM_FEWSHOT
    data_dir: Path | None = None

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r} in this suite; tasks: {[t.name for t in self.tasks]}")

    @property
    def skipped(self) -> dict[str, dict[str, int]]:
        return {t.name: dict(t.skipped) for t in self.tasks}


def _stable(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def stratified_limit(items: Sequence[Item], limit: int | None) -> tuple[Item, ...]:
    """A deterministic subset of ``limit`` items, spread over exams in proportion to size.

    Each exam gets its proportional share (largest remainder, ties by exam name); inside an
    exam, items are taken in the order of a hash of their id, so the subset does not depend
    on file order or on the process. The items keep their original order.
    """
    if limit is None or limit >= len(items):
        return tuple(items)
    if limit <= 0:
        raise SuiteError(f"limit={limit} must be a positive number of items per task")
    by_exam: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        by_exam[item.exam].append(item)
    total = len(items)
    quotas = {e: limit * len(v) / total for e, v in by_exam.items()}
    counts = {e: int(q) for e, q in quotas.items()}
    leftover = limit - sum(counts.values())
    for exam in sorted(quotas, key=lambda e: (-(quotas[e] - counts[e]), e))[:leftover]:
        counts[exam] += 1
    keep: set[str] = set()
    for exam, members in by_exam.items():
        keep.update(i.id for i in sorted(members, key=lambda i: _stable(i.id))[: counts[exam]])
    return tuple(i for i in items if i.id in keep)


def positions(items: Sequence[Item], kept: Sequence[Item]) -> tuple[int, ...]:
    """Where each kept item sits in ``items``: the dataset indices lm-eval's ``--samples``
    takes to score the same subset."""
    where = {item.id: index for index, item in enumerate(items)}
    return tuple(where[item.id] for item in kept)


def _domain_items(domain: str, *, source: str, data_dir: Path | None,
                  hub_paths: dict[str, str] | None) -> DomainItems:
    if source == "sample":
        return load_sample(domain)
    if source == "data":
        if data_dir is None:
            raise SuiteError(f"no data directory for the {domain!r} items: pass --data-dir DIR or "
                             f"set {DATA_DIR_ENV}, or use the shipped sample suite")
        return load_data_dir(domain, data_dir)
    if source == "hub":
        from benchmarks_ptbr.hub import load_hub

        return load_hub(domain, paths=hub_paths)
    raise SuiteError(f"unknown item source {source!r}; choose from {', '.join(SOURCES)}")


def _leaderboard_suite(*, split: str, source: str, domains: Sequence[str] | None,
                       data_dir: str | Path | None, limit: int | None,
                       num_fewshot: int) -> Suite:
    from benchmarks_ptbr.leaderboard import load_leaderboard

    if split != "leaderboard" or source != "leaderboard":
        raise SuiteError(f"split={split!r} with source={source!r}: the leaderboard suite is "
                         "split='leaderboard', source='leaderboard'")
    resolved = resolve_data_dir(data_dir)
    if resolved is None:
        raise SuiteError(f"the leaderboard suite reads the PT-BR data: pass --data-dir DIR or "
                         f"set {DATA_DIR_ENV}")
    return load_leaderboard(data_dir=resolved, domains=domains, limit=limit,
                            num_fewshot=num_fewshot)


def load_suite(*, split: str, source: str = "sample", domains: Sequence[str] | None = None,
               data_dir: str | Path | None = None, limit: int | None = None,
               num_fewshot: int = DEFAULT_NUM_FEWSHOT,
               hub_paths: dict[str, str] | None = None) -> Suite:
    """Load the tasks of one split.

    ``source``: ``"sample"`` (shipped with the package), ``"data"`` (a data directory:
    ``data_dir`` or ``$BRMERGE_DATA_DIR``) or ``"hub"`` (Hugging Face dataset ids; ``hub_paths``
    maps an id to a local copy). ``limit`` caps the scored items per task (stratified).
    """
    if source == "leaderboard" or split == "leaderboard":
        return _leaderboard_suite(split=split, source=source, domains=domains,
                                  data_dir=data_dir, limit=limit, num_fewshot=num_fewshot)
    if split not in SPLITS:
        raise SuiteError(f"split={split!r}; choose 'dev' (search) or 'test' (held-out reports)")
    if source not in SOURCES:
        raise SuiteError(f"source={source!r}; choose from {', '.join(SOURCES)}")
    if num_fewshot < 0:
        raise SuiteError(f"num_fewshot={num_fewshot} must be 0 or more")
    available = SAMPLE_DOMAINS if source == "sample" else DOMAINS
    if source == "hub":
        from benchmarks_ptbr.hub import HUB_DOMAINS

        available = HUB_DOMAINS
    domains = tuple(domains) if domains else available
    unknown = [d for d in domains if d not in available]
    if unknown:
        raise SuiteError(f"unknown domain(s) {', '.join(unknown)} for the {source} suite; "
                         f"choose from {', '.join(available)}")
    resolved = resolve_data_dir(data_dir) if source == "data" else None
    preferred = SAMPLE_FEWSHOT_IDS if source == "sample" else FEWSHOT_IDS
    tasks = []
    for domain in domains:
        loaded = _domain_items(domain, source=source, data_dir=resolved, hub_paths=hub_paths)
        dev = loaded.items["dev"]
        shots = select_shots(dev, preferred=preferred.get(domain, ()), k=num_fewshot)
        if len(shots) < num_fewshot:   # lm-eval's sampler refuses this too (random.sample)
            raise SuiteError(f"num_fewshot={num_fewshot} needs {num_fewshot} {domain} shots from the dev split "
                             f"of the {source} suite, which has {len(dev)} usable items: ask for fewer shots")
        skipped = dict(loaded.skipped[split])
        scorable = loaded.items[split]
        if split == "dev":
            # Few-shot examples are never scored: drop them (and their twins) from dev.
            drop = excluded_ids(shots, dev)
            scorable = [i for i in scorable if i.id not in drop]
            skipped[SKIP_FEWSHOT] = len(drop)
        if not scorable and split == "dev" and skipped[SKIP_FEWSHOT]:
            raise SuiteError(f"the dev split of the {source} suite has {len(loaded.items['dev'])} usable {domain} "
                             f"items and num_fewshot={num_fewshot} takes {skipped[SKIP_FEWSHOT]} of them as "
                             "shots (with their twins), leaving none to score: ask for fewer shots")
        if not scorable:
            raise SuiteError(f"no scorable {domain} items in the {split} split of the {source} "
                             "suite; check the data directory and the split years")
        kept = stratified_limit(scorable, limit)
        tasks.append(Task(
            name=task_name(domain, split, source=source), domain=domain, split=split,
            source=source, shots=tuple(shots), items=kept, skipped=skipped,
            n_available=len(scorable), indices=positions(scorable, kept),
        ))
    return Suite(source=source, split=split, tasks=tuple(tasks), limit=limit,
                 num_fewshot=num_fewshot, data_dir=resolved)
