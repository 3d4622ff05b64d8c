"""Answer-letter extraction from generated text, as the Open PT LLM Leaderboard does it.

The Leaderboard's filter chain (eduagarcia/lm-evaluation-harness-pt @ ca07215,
``lm_eval/filters/{decontamination,extraction,custom}.py`` and the ``filter_list`` of
``enem.yaml`` / ``oab_exams.yaml``): ``normalize_spaces`` (newlines, tabs and carriage
returns become spaces, runs of spaces collapse, ends stripped), ``remove_accents``, then
``find_choices``: the text itself when it is one of the letters, else the first match of the
first pattern that matches, else ``"[invalid]"``. The keyword pattern is case-sensitive
except for each word's first letter (``[Ll]etra`` accepts "Letra" and "letra", not
"LETRA"). One difference: the Leaderboard removes accents with ``unidecode``, we with
Unicode decomposition; they differ only on characters with no Latin decomposition, which
no pattern reads.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

INVALID = "[invalid]"

_KEYWORDS = ("[Ll]etra|[Aa]lternativa|[Rr]esposta|[Rr]esposta [Cc]orreta|"
             "[Rr]esposta [Cc]orreta e|[Oo]pcao")


def _normalize(text: str) -> str:
    text = text.replace("\n", " ").replace("\r", " ").replace("\t", " ")
    text = re.sub(" +", " ", text).strip()
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


@lru_cache(maxsize=64)
def _patterns(letters: str) -> tuple[re.Pattern[str], ...]:
    cls = f"[{re.escape(letters)}]"
    return (
        re.compile(rf"(?:{_KEYWORDS}):? ({cls})\b"),
        re.compile(rf"\b({cls})\."),
        re.compile(rf"\b({cls}) ?[.):-]"),
        re.compile(rf"\b({cls})$"),
        re.compile(rf"\b({cls})\b"),
    )


def extract_letter(text: str, labels: Sequence[str]) -> str:
    """The answer letter in ``text`` among ``labels`` (e.g. "ABCD"), or ``INVALID``."""
    normalized = _normalize(text).strip()
    if normalized in labels:
        return normalized
    for pattern in _patterns("".join(labels)):
        found = pattern.search(normalized)
        if found:
            return found.group(1)
    return INVALID
