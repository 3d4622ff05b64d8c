"""Items from Hugging Face dataset ids, mapped to the item schema of DESIGN.md.

Needs hub access (or a local copy laid out like the hub dataset: pass its folder in
``paths``). Each mapper turns one hub row into a schema row; validation, splits and skip
counts are then exactly those of the data-directory suites.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from benchmarks_ptbr.items import DataError, SuiteError

SKIP_MIRRORED = "in_other_mirror"  # skip reason: already loaded from another hub dataset
from benchmarks_ptbr.sources import (
    DATA_SOURCES,
    DomainItems,
    Source,
    classify,
    drop_repeated_content,
)

LETTERS = "ABCDE"


def _choices_from_columns(choices: Any, *, at: str) -> list[dict[str, str]]:
    """Hub MCQ datasets store choices as ``{"text": [...], "label": [...]}``."""
    if isinstance(choices, dict) and isinstance(choices.get("label"), list):
        return [{"label": str(lab), "text": str(txt)}
                for lab, txt in zip(choices["label"], choices.get("text") or [])]
    raise DataError(f"{at}: 'choices' = {choices!r:.80} is not a {{text: [...], label: [...]}} column")


def map_oab(row: dict[str, Any], *, at: str) -> dict[str, Any]:
    """``eduagarcia/oab_exams``: id, exam_id, exam_year, question, choices, answerKey, nullified."""
    nullified = bool(row.get("nullified"))
    return {"id": row.get("id"), "exam_id": row.get("exam_id"), "year": row.get("exam_year"),
            "question": row.get("question"), "choices": _choices_from_columns(row.get("choices"), at=at),
            "answerKey": row.get("answerKey") or None, "nullified": nullified,
            "usable_text_only": not nullified}


_YEAR = re.compile(r"(19|20)\d\d")


def _year_from(*values: Any) -> str | None:
    for value in values:
        found = _YEAR.search(str(value or ""))
        if found:
            return found.group(0)
    return None


def _has_figure(row: dict[str, Any]) -> bool:
    figure_columns = ("figures", "images", "image")
    return any(row.get(c) for c in figure_columns) or "[[placeholder]]" in str(row.get("question"))


def map_enem_challenge(row: dict[str, Any], *, at: str) -> dict[str, Any]:
    """``eduagarcia/enem_challenge``: id (``2022_21``), exam_id, question, choices, answerKey."""
    year = _year_from(row.get("exam_id"), row.get("id"))
    return {"id": f"enem_{row.get('id')}", "year": year, "question": row.get("question"),
            "choices": _choices_from_columns(row.get("choices"), at=at),
            "answerKey": row.get("answerKey") or None, "usable_text_only": not _has_figure(row)}


def map_maritaca_enem(row: dict[str, Any], *, at: str) -> dict[str, Any]:
    """``maritaca-ai/enem``: id (``questao_01``), exam, IU, question, alternatives, label."""
    alternatives = row.get("alternatives")
    if not isinstance(alternatives, list):
        raise DataError(f"{at}: 'alternatives' = {alternatives!r:.80} is not a list of option texts")
    label = str(row.get("label") or "").strip()
    annulled = label.lower().startswith("anulad")
    number = re.sub(r"\D", "", str(row.get("id")))
    year = _year_from(row.get("exam"))
    return {"id": f"enem_{year}_{int(number) if number else row.get('id')}", "year": year,
            "question": row.get("question"),
            "choices": [{"label": LETTERS[i], "text": str(t)} for i, t in enumerate(alternatives)],
            "answerKey": None if annulled or not label else label, "annulled": annulled,
            "usable_text_only": not (bool(row.get("IU")) or _has_figure(row))}


@dataclass(frozen=True)
class HubDataset:
    dataset_id: str
    domain: str
    mapper: Callable[..., dict[str, Any]]
    configs: tuple[str | None, ...] = (None,)  # dataset configs loaded from the hub


def _same_split(domain_source: str, dataset_id: str) -> Source:
    """Hub mirrors use the split years of the corresponding data folder."""
    base = next(s for s in DATA_SOURCES if s.name == domain_source)
    return Source(dataset_id, base.domain, base.dev_years, base.test_years,
                  exam_field="exam_id" if base.exam_field == "exam_id" else None)


HUB_DATASETS: tuple[tuple[HubDataset, Source], ...] = (
    (HubDataset("eduagarcia/oab_exams", "legal", map_oab),
     _same_split("oab_exams", "eduagarcia/oab_exams")),
    (HubDataset("eduagarcia/enem_challenge", "enem", map_enem_challenge),
     _same_split("enem_dev", "eduagarcia/enem_challenge")),
    # One config per exam year on the hub; years already in enem_challenge are skipped.
    (HubDataset("maritaca-ai/enem", "enem", map_maritaca_enem, configs=("2022", "2023", "2024")),
     _same_split("gpt4_enem", "maritaca-ai/enem")),
)
HUB_DOMAINS = tuple(dict.fromkeys(h.domain for h, _ in HUB_DATASETS))


def _hub_rows(spec: HubDataset, *, path: str | None) -> Iterable[tuple[str, dict[str, Any]]]:
    import datasets

    if path is not None:
        # A local copy in the hub layout: every data file of the folder, as the hub would.
        loaded = [(None, datasets.load_dataset(path))]
    else:
        loaded = [(c, datasets.load_dataset(spec.dataset_id, c)) for c in spec.configs]
    for config, dataset_dict in loaded:
        for split_name, split in dataset_dict.items():
            for index, row in enumerate(split, start=1):
                tag = f"{spec.dataset_id}{'/' + config if config else ''}[{split_name}]"
                at = f"{tag}:{index}"
                yield at, spec.mapper(row, at=at)


def load_hub(domain: str, *, paths: dict[str, str] | None = None) -> DomainItems:
    """Items of ``domain`` from its hub datasets; ``paths`` maps a dataset id to a local copy."""
    specs = [(h, s) for h, s in HUB_DATASETS if h.domain == domain]
    if not specs:
        raise SuiteError(f"no Hugging Face dataset is mapped for the {domain!r} domain; "
                         f"hub domains are {', '.join(HUB_DOMAINS)} (use --data-dir for the rest)")
    out = DomainItems(domain)
    seen: dict[str, str] = {}
    origin: dict[str, str] = {}  # id -> dataset id that supplied it
    for hub, source in specs:
        classify(_skip_mirrored(_hub_rows(hub, path=(paths or {}).get(hub.dataset_id)),
                                hub, source, out, origin), source, out, seen=seen)
    drop_repeated_content(out)
    return out


def _skip_mirrored(rows: Iterable[tuple[str, dict[str, Any]]], hub: HubDataset, source: Source,
                   out: DomainItems, origin: dict[str, str]) -> Iterable[tuple[str, dict[str, Any]]]:
    """The same ENEM question can be in two mirrors: the first dataset listed wins, and the
    copy is counted (not silently dropped). Duplicates inside one dataset stay errors."""
    for at, row in rows:
        item_id = str(row.get("id"))
        first = origin.setdefault(item_id, hub.dataset_id)
        if first != hub.dataset_id:
            split = source.split_of(row, at=at)
            if split is not None:
                out.skipped[split][SKIP_MIRRORED] += 1
            continue
        yield at, row
