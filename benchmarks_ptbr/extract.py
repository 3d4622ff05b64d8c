"""Answer-letter extraction from generated text, as the Open PT LLM Leaderboard does it.

Normalize spaces, remove accents, then take the first match of the first pattern that
matches (an explicit "Resposta: X" first, a bare letter last); "[invalid]" when none does.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

INVALID = "[invalid]"


def _normalize(text: str) -> str:
    text = " ".join(text.split())
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


@lru_cache(maxsize=64)
def _patterns(letters: str) -> tuple[re.Pattern[str], ...]:
    cls = f"[{re.escape(letters)}]"
    return (
        re.compile(rf"(?i:Letra|Alternativa|Resposta|Resposta Correta|Resposta Correta e|Opcao)"
                   rf":? ({cls})\b"),
        re.compile(rf"\b({cls})\."),
        re.compile(rf"\b({cls}) ?[.):-]"),
        re.compile(rf"\b({cls})$"),
        re.compile(rf"\b({cls})\b"),
    )


def extract_letter(text: str, labels: Sequence[str]) -> str:
    """The answer letter in ``text`` among ``labels`` (e.g. "ABCD"), or ``INVALID``."""
    normalized = _normalize(text)
    for pattern in _patterns("".join(labels)):
        found = pattern.search(normalized)
        if found:
            return found.group(1)
    return INVALID
