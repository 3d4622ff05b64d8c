"""Where items come from, and which split each one belongs to.

The split table of the suites lives here, in one place. Exam years decide the split, so
that no exam is in both dev and test; HealthBench-BR has no years and is split by
protocol document (a stable hash of the file name), so no protocol is in both.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks_ptbr.items import (
    SKIP_ANNULLED,
    SKIP_CONFLICTING,
    SKIP_DUPLICATE,
    SKIP_NO_KEY,
    SKIP_NOT_TEXT_ONLY,
    SKIP_OTHER_TRACK,
    SKIP_OUTSIDE_SPLITS,
    DataError,
    SuiteError,
    Item,
    as_bool,
    check_key,
    normalize_text,
    parse_choices,
    problem_reason,
    read_jsonl,
    row_id,
    row_year,
)

SPLITS = ("dev", "test")
SUITES = ("sample", *SPLITS, "leaderboard")   # what `brmerge eval --suite` takes
DOMAINS = ("legal", "health", "enem", "healthbench")
SAMPLE_DOMAINS = ("legal", "health", "enem")
SAMPLE_DIR = Path(__file__).resolve().parent / "sample"

# HealthBench-BR statements become two-option questions so every task scores answer letters.
TRUE_FALSE = (("A", "Verdadeiro"), ("B", "Falso"))


def _years(first: int, last: int) -> frozenset[int]:
    return frozenset(range(first, last + 1))


@dataclass(frozen=True)
class Source:
    """One data folder (or dataset id) feeding a domain, with its split rule."""

    name: str                                   # folder under the data dir, or a dataset id
    domain: str
    dev_years: frozenset[int] = frozenset()
    test_years: frozenset[int] = frozenset()
    exam_field: str | None = None               # field naming the exam edition; None: the year
    split_by: str = "year"                      # "year" | "protocol" | "field"
    true_false: bool = False                    # HealthBench-BR layout (statement, label)

    def split_of(self, row: dict[str, Any], *, at: str) -> str | None:
        if self.split_by == "field":
            value = row.get("split")
            if value not in SPLITS:
                raise DataError(f"{at}: item {row.get('id')!r}: 'split' = {value!r}; "
                                "use 'dev' or 'test'")
            return value
        if self.split_by == "protocol":
            protocol = str(row.get("arquivo") or row.get("titulo") or "")
            if not protocol:
                raise DataError(f"{at}: item {row.get('id')!r} has no 'arquivo' (protocol file); "
                                "it is needed to split HealthBench-BR by protocol")
            # A hash of the protocol name, not file order: adding protocols never moves old ones.
            return "dev" if hashlib.sha256(protocol.encode()).digest()[0] % 2 == 0 else "test"
        year = row_year(row, at=at)
        if year in self.dev_years:
            return "dev"
        if year in self.test_years:
            return "test"
        return None


# The split table (docs/evaluation.md mirrors it). ENEM 2024 comes from gpt4_enem.
DATA_SOURCES: tuple[Source, ...] = (
    Source("oab_exams", "legal", _years(2010, 2014), _years(2015, 2018), exam_field="exam_id"),
    Source("revalida", "health", _years(2017, 2021), _years(2022, 2024), exam_field="edition"),
    Source("teste_progresso", "health", frozenset({2013, 2019, 2020}), _years(2021, 2023)),
    Source("enem_dev", "enem", _years(2009, 2021), _years(2022, 2024)),
    Source("gpt4_enem", "enem", _years(2009, 2021), _years(2022, 2024)),
    Source("healthbench_br", "healthbench", split_by="protocol", exam_field="arquivo",
           true_false=True),
)

SAMPLE_SOURCE_FOR = {d: Source("sample", d, split_by="field", exam_field="topic")
                     for d in SAMPLE_DOMAINS}


@dataclass
class DomainItems:
    """A domain's usable items per split, and what was skipped per split."""

    domain: str
    items: dict[str, list[Item]] = field(default_factory=lambda: {s: [] for s in SPLITS})
    skipped: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in SPLITS})


def _skip_reason(row: dict[str, Any], *, at: str) -> str | None:
    if (any(as_bool(row[f], field=f, at=at) for f in ("annulled", "nullified") if f in row
            and row[f] is not None) or str(row.get("flag") or "").upper() == "NULA"):
        return SKIP_ANNULLED
    if row.get("language") == "espanhol":
        # ENEM questions 1-5 come in English and Spanish variants; we keep the English track.
        return SKIP_OTHER_TRACK
    if row.get("problem") is not None:
        # The data's own review says why (these rows also carry usable_text_only: false).
        return problem_reason(row["problem"], at=at)
    if "usable_text_only" in row and not as_bool(row["usable_text_only"],
                                                 field="usable_text_only", at=at):
        return SKIP_NOT_TEXT_ONLY
    if row.get("answerKey") in (None, ""):
        return SKIP_NO_KEY
    return None


def _true_false_row(row: dict[str, Any], *, at: str) -> dict[str, Any]:
    """HealthBench-BR ``statement``/``label`` as a schema row with options A/B."""
    label = str(row.get("label", "")).strip().lower()
    if label not in ("verdadeiro", "falso"):
        raise DataError(f"{at}: item {row.get('id')!r}: 'label' = {row.get('label')!r}; "
                        "use 'Verdadeiro' or 'Falso'")
    if not isinstance(row.get("statement"), str) or not row["statement"].strip():
        raise DataError(f"{at}: item {row.get('id')!r}: missing 'statement' text")
    return {**row, "question": row["statement"],
            "choices": [{"label": k, "text": t} for k, t in TRUE_FALSE],
            "answerKey": "A" if label == "verdadeiro" else "B"}


def classify(rows: Iterable[tuple[str, dict[str, Any]]], source: Source,
             into: DomainItems, *, seen: dict[str, str]) -> None:
    """Validate rows (``at`` names file:line) and sort them into splits or skip counts.

    ``seen`` maps ids already loaded for the domain to where they came from, so duplicate
    ids are caught across files too.
    """
    for at, row in rows:
        item_id = row_id(row, at=at)
        if item_id in seen:
            raise DataError(f"{at}: duplicate id {item_id!r} (first seen at {seen[item_id]}); "
                            "ids must be unique within a domain")
        seen[item_id] = at
        if source.true_false:
            row = _true_false_row(row, at=at)
        split = source.split_of(row, at=at)
        reason = _skip_reason(row, at=at)
        key = row.get("answerKey")
        labels: tuple[str, ...] = ()
        texts: tuple[str, ...] = ()
        if reason is None or (isinstance(row.get("choices"), list) and key not in (None, "")):
            # Keys are checked even on skipped items that have options: a wrong key is bad data.
            labels, texts = parse_choices(row, at=at)
            check_key(key, labels, item_id=item_id, at=at)
        if split is None:
            # Counted in both splits' reports: the item belongs to neither.
            for s in SPLITS:
                into.skipped[s][SKIP_OUTSIDE_SPLITS] += 1
            continue
        if reason is not None:
            into.skipped[split][reason] += 1
            continue
        question = row.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{at}: item {item_id!r}: missing or empty 'question'; "
                            "add the question text or set usable_text_only to false")
        year = None if source.split_by == "protocol" else (
            row_year(row, at=at) if any(row.get(f) is not None for f in ("year", "exam_year"))
            else None)
        exam_value = row.get(source.exam_field) if source.exam_field else None
        exam = str(exam_value) if exam_value not in (None, "") else str(year)
        into.items[split].append(Item(
            id=item_id, question=question, labels=labels, texts=texts,
            answer=str(row["answerKey"]).strip(), year=year, exam=exam, source=source.name,
            note=str(row.get("source_note") or ""), pair=str(row.get("pair_id") or ""),
        ))


def _content_key(item: Item) -> tuple[str, tuple[str, ...]]:
    # Options sorted: the same question with its options reordered is still the same question.
    return normalize_text(item.question), tuple(sorted(normalize_text(t) for t in item.texts))


def drop_repeated_content(into: DomainItems) -> None:
    """Skip items whose normalized question and options repeat another item of the split.

    Same content and the same answer text: the first item is kept, later ones are counted as
    ``duplicate`` (an item must not weigh twice). Same content with different answers: every
    copy is counted as ``conflicting_keys`` (no answer can be right). Works on any data.
    """
    for split in SPLITS:
        groups: dict[tuple[str, tuple[str, ...]], list[Item]] = {}
        for item in into.items[split]:
            groups.setdefault(_content_key(item), []).append(item)
        drop: dict[str, str] = {}
        for members in groups.values():
            if len(members) < 2:
                continue
            answers = {normalize_text(m.texts[m.labels.index(m.answer)]) for m in members}
            if len(answers) > 1:
                drop.update((m.id, SKIP_CONFLICTING) for m in members)
            else:
                drop.update((m.id, SKIP_DUPLICATE) for m in members[1:])
        if drop:
            into.items[split] = [i for i in into.items[split] if i.id not in drop]
            for reason in drop.values():
                into.skipped[split][reason] += 1


def _jsonl_rows(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    for line, row in read_jsonl(path):
        yield f"{path}:{line}", row


def load_data_dir(domain: str, data_dir: Path,
                  sources: tuple[Source, ...] = DATA_SOURCES) -> DomainItems:
    """Items of ``domain`` from ``<data_dir>/<source>/derived/*.jsonl``; ``sources`` is the
    split table (the leaderboard suite passes its own years)."""
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise DataError(f"data directory {str(data_dir)!r} does not exist; pass "
                                "--data-dir DIR or set BRMERGE_DATA_DIR to the PT-BR data folder")
    out = DomainItems(domain)
    seen: dict[str, str] = {}
    found = []
    for source in sources:
        if source.domain != domain:
            continue
        for path in sorted((data_dir / source.name / "derived").glob("*.jsonl")):
            found.append(path)
            classify(_jsonl_rows(path), source, out, seen=seen)
    if not found:
        expected = ", ".join(f"{s.name}/derived/*.jsonl" for s in sources
                             if s.domain == domain)
        raise DataError(f"no {domain} data under {data_dir} (expected {expected}); "
                                "point --data-dir / BRMERGE_DATA_DIR at the PT-BR data folder")
    drop_repeated_content(out)
    return out


def load_sample(domain: str, sample_dir: Path = SAMPLE_DIR) -> DomainItems:
    """The shipped sample suite: ``sample/<domain>.jsonl`` with an explicit ``split`` field."""
    if domain not in SAMPLE_SOURCE_FOR:
        raise SuiteError(f"the sample suite has no {domain!r} domain; "
                         f"choose from {', '.join(SAMPLE_DOMAINS)}")
    out = DomainItems(domain)
    classify(_jsonl_rows(sample_dir / f"{domain}.jsonl"), SAMPLE_SOURCE_FOR[domain], out, seen={})
    drop_repeated_content(out)
    return out
