"""The item model and the strict JSONL reader behind every suite.

Rows follow the item schema of DESIGN.md (``id, question, choices:[{label,text}],
answerKey, year, usable_text_only``; extra fields allowed). Bad data raises
:class:`DataError` naming the file and line; items that are merely unusable (an image
is needed, the question was annulled, there is no key) are *skipped and counted* by the
caller, never dropped silently.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_core.errors import BrmergeError

# Why an item is not scored. Each skipped item is counted under the first reason that applies.
SKIP_ANNULLED = "annulled"
SKIP_NO_KEY = "no_key"
SKIP_NOT_TEXT_ONLY = "not_text_only"
SKIP_OTHER_TRACK = "other_language_track"  # ENEM Spanish variants (the English track is kept)
SKIP_OUTSIDE_SPLITS = "year_outside_splits"
SKIP_FEWSHOT = "fewshot"  # used as a few-shot example of this task, so never scored
# Content guards (any data directory): the same normalized question and options as an earlier
# item of the split (it would weigh twice), or the same content under different keys (no
# answer is right). A ``problem`` field of the data says the same thing: ``duplicate_of:<id>``
# counts as ``duplicate``; any other problem (``conflicting_keys``, ``missing_context``,
# ``duplicate_options``, ...) is its own reason.
SKIP_DUPLICATE = "duplicate"
SKIP_CONFLICTING = "conflicting_keys"
SKIP_REASONS = (SKIP_ANNULLED, SKIP_NO_KEY, SKIP_NOT_TEXT_ONLY, SKIP_OTHER_TRACK,
                SKIP_OUTSIDE_SPLITS, SKIP_FEWSHOT, SKIP_DUPLICATE, SKIP_CONFLICTING)


class DataError(BrmergeError):
    """A data file is malformed; the message names the file, the line and the fix."""


class SuiteError(BrmergeError):
    """A suite cannot be built as asked (unknown domain, split or source, no data directory,
    a bad limit); the message names the option and the fix."""


def problem_reason(value: Any, *, at: str) -> str:
    """The skip reason a ``problem`` field gives: ``duplicate_of:<id>`` is ``duplicate``, any
    other value is its part before the first colon (``missing_context``, ...)."""
    if not isinstance(value, str) or not value.strip() or not value.split(":")[0].strip():
        raise DataError(f"{at}: field 'problem' = {value!r} is not a reason; write e.g. "
                        "'duplicate_of:<id>' or 'missing_context', or drop the field")
    reason = value.split(":")[0].strip()
    return SKIP_DUPLICATE if reason == "duplicate_of" else reason


def normalize_text(text: str) -> str:
    """Text as compared by the content guards: NFKC, case-folded, whitespace collapsed, and
    no final punctuation (transcriptions of the same option differ by a closing period)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split()).rstrip(" .;:,")


@dataclass(frozen=True)
class Item:
    """One scorable multiple-choice question."""

    id: str
    question: str
    labels: tuple[str, ...]   # option letters in display order, e.g. ("A", "B", "C", "D")
    texts: tuple[str, ...]    # option texts, aligned with ``labels``
    answer: str               # the gold label, one of ``labels``
    year: int | None
    exam: str                 # stratification key for ``limit`` (exam edition, protocol, topic)
    source: str               # where the item came from (data folder, dataset id, "sample")
    note: str = ""            # short source note (sample suite), else empty
    pair: str = ""            # twin group (HealthBench-BR true/false pairs): shots exclude twins


def where(path: Path | str, line: int) -> str:
    return f"{path}:{line}"


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, row)`` for each non-blank line; malformed JSON is an error."""
    try:
        fh = open(path, "rb")   # bytes, so a non-UTF-8 line is reported with its number
    except OSError as exc:
        raise DataError(f"cannot read data file {str(path)!r}: {exc.strerror or exc}") from None
    with fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{where(path, number)}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at "
                                f"column {exc.start + 1}); re-save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{where(path, number)}: malformed JSON ({exc.msg} at column {exc.colno}); "
                    "fix the line or remove it"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{where(path, number)}: expected a JSON object per line, got "
                    f"{type(row).__name__}; write one item object per line"
                )
            yield number, row


def as_bool(value: Any, *, field: str, at: str) -> bool:
    """Derived files type flags as JSON booleans, but hand-made files often use strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise DataError(f"{at}: field {field!r} = {value!r} is not a boolean; use true or false")


def as_year(value: Any, *, field: str, at: str) -> int:
    if isinstance(value, bool):  # bool is an int subclass; a year is never true/false
        raise DataError(f"{at}: field {field!r} = {value!r} is not a year; use e.g. 2015")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    raise DataError(f"{at}: field {field!r} = {value!r} is not a year; use e.g. 2015")


def row_year(row: dict[str, Any], *, at: str) -> int:
    for field in ("year", "exam_year"):
        if row.get(field) is not None:
            return as_year(row[field], field=field, at=at)
    raise DataError(f"{at}: item {row.get('id')!r} has no 'year' (or 'exam_year'); "
                    "add the exam year so it can be put in a split")


def row_id(row: dict[str, Any], *, at: str) -> str:
    value = row.get("id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise DataError(f"{at}: missing or empty 'id' (got {value!r}); give every item a unique id")
    return str(value)


def parse_choices(row: dict[str, Any], *, at: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``choices`` as aligned label/text tuples; labels must be unique single tokens."""
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(f"{at}: item {row.get('id')!r}: 'choices' must be a list of at least "
                        f"two {{label, text}} objects, got {choices!r:.80}")
    labels: list[str] = []
    texts: list[str] = []
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict) or "label" not in choice or "text" not in choice:
            raise DataError(f"{at}: item {row.get('id')!r}: choices[{position}] = {choice!r:.80} "
                            "is not a {label, text} object")
        label, text = str(choice["label"]).strip(), choice["text"]
        if not label or len(label.split()) != 1:
            raise DataError(f"{at}: item {row.get('id')!r}: choice label {choice['label']!r} "
                            "must be one word, e.g. 'A'")
        if label in labels:
            raise DataError(f"{at}: item {row.get('id')!r}: choice label {label!r} repeats; "
                            "labels must be unique")
        if not isinstance(text, str):
            raise DataError(f"{at}: item {row.get('id')!r}: text of choice {label!r} is "
                            f"{text!r:.40}, not a string")
        labels.append(label)
        texts.append(text)
    return tuple(labels), tuple(texts)


def check_key(key: Any, labels: tuple[str, ...], *, item_id: str, at: str) -> str:
    key = str(key).strip()
    if key not in labels:
        raise DataError(f"{at}: item {item_id!r}: answerKey {key!r} is not among the choice "
                        f"labels {list(labels)}; fix the key or the labels")
    return key
