"""Answer-letter extraction from generated text, as the Open PT LLM Leaderboard does it.

The Leaderboard's harness (eduagarcia/lm-evaluation-harness-pt @ ca07215):

1. ``lm_eval/models/huggingface.py`` ``generate_until``: the decoded generation (special
   tokens skipped) loses everything up to the last ``</think>`` (then stripped), and is cut at
   the first ``"\\n\\n"`` (the task's ``until``) — in that order (:func:`clean_generation`).
2. The ``filter_list`` of ``enem.yaml`` / ``oab_exams.yaml``: ``normalize_spaces``
   (``lm_eval/filters/decontamination.py``: newlines, tabs and carriage returns become spaces,
   runs of spaces collapse, ends stripped), ``remove_accents`` (``lm_eval/filters/extraction.py``:
   ``unidecode``), then ``find_choices`` (``lm_eval/filters/custom.py``: the stripped text itself
   when it is one of the letters, else group 1 of the first pattern that matches, else
   ``"[invalid]"``). The keyword pattern is case-sensitive except for each word's first letter.

``unidecode`` is GPL-licensed, so it is not a dependency: :func:`transliterate` is our own
table, equal to ``unidecode`` on every character of the ENEM and OAB data and on Latin-1,
Latin Extended-A, general punctuation, basic Greek and Russian Cyrillic (tested against
``unidecode`` itself); outside those, letters lose their accents by Unicode (compatibility)
decomposition and anything else is kept, where ``unidecode`` would still transliterate.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache

INVALID = "[invalid]"
THINK_END = "</think>"
UNTIL = "\n\n"  # the tasks' stop sequence (lm-eval's default: the few-shot delimiter)

_KEYWORDS = ("[Ll]etra|[Aa]lternativa|[Rr]esposta|[Rr]esposta [Cc]orreta|"
             "[Rr]esposta [Cc]orreta e|[Oo]pcao")


def _pairs(spec: str) -> dict[str, str]:
    # "abc=xyz" entries separated by spaces: each character maps to one replacement
    out: dict[str, str] = {}
    for entry in spec.split(" "):
        char, _, repl = entry.partition("=")
        out[char] = repl
    return out


# Characters whose ASCII form is not their decomposition without marks. Written per block.
_TABLE: dict[str, str] = {
    # Latin-1 supplement
    **_pairs("¡=! ¢=C/ £=PS ¤=$? ¥=Y= ¦=| §=SS ©=(c) «=<< ¬=! ®=(r) ¯=- °=deg ±=+- ´=' µ=u "
             "¶=P ·=* ¸=, »=>> ¿=? Æ=AE Ð=D ×=x Ø=O Þ=Th ß=ss æ=ae ð=d ÷=/ ø=o þ=th"),
    "\u00a8": '"', "\u00ad": "", "\u00bc": " 1/4", "\u00bd": " 1/2", "\u00be": " 3/4",
    # Latin extended-A
    **_pairs("Đ=D đ=d Ħ=H ħ=h ı=i ĸ=k Ŀ=L ŀ=l Ł=L ł=l ŉ='n Ŋ=NG ŋ=ng Œ=OE œ=oe Ŧ=T ŧ=t"),
    # General punctuation (U+2010-U+203F)
    **_pairs("‐=- ‑=- ‒=- –=- —=-- ―=-- ‖=|| ‗=_ ‘=' ’=' ‚=, ‛=' „=,, †=+ ‡=++ •=* ‣=*> ‧=. "
             "‰=%0 ‱=%00 ′=' ″='' ‴=''' ‵=` ‶=`` ‷=``` ‸=^ ‹=< ›=> ※=* ‽=!? ‾=- ‿=_"),
    "\u201c": '"', "\u201d": '"', "\u201f": '"', "\u2028": "\n", "\u2029": "\n\n",
    **{chr(c): "" for c in range(0x202a, 0x202f)},
    # Greek and Russian letters (their usual romanization), accented ones by decomposition
    **_pairs("Α=A Β=B Γ=G Δ=D Ε=E Ζ=Z Η=E Θ=Th Ι=I Κ=K Λ=L Μ=M Ν=N Ξ=Ks Ο=O Π=P Ρ=R Σ=S Τ=T "
             "Υ=U Φ=Ph Χ=Kh Ψ=Ps Ω=O α=a β=b γ=g δ=d ε=e ζ=z η=e θ=th ι=i κ=k λ=l μ=m ν=n ξ=x "
             "ο=o π=p ρ=r ς=s σ=s τ=t υ=u φ=ph χ=kh ψ=ps ω=o"),
    **_pairs("А=A Б=B В=V Г=G Д=D Е=E Ж=Zh З=Z И=I Й=I К=K Л=L М=M Н=N О=O П=P Р=R С=S Т=T "
             "У=U Ф=F Х=Kh Ц=Ts Ч=Ch Ш=Sh Щ=Shch Ъ=' Ы=Y Ь=' Э=E Ю=Iu Я=Ia а=a б=b в=v г=g "
             "д=d е=e ж=zh з=z и=i й=i к=k л=l м=m н=n о=o п=p р=r с=s т=t у=u ф=f х=kh ц=ts "
             "ч=ch ш=sh щ=shch ъ=' ы=y ь=' э=e ю=iu я=ia"),
    "\u0387": ";", "\u0390": "I",  # Greek ano teleia; iota with dialytika and tonos
    # other letters, arrows and math signs of the exam texts
    **_pairs("І=I ҫ=s' ℃=degC ↑=| →=- ↔=- ⇌=="),
    **{c: "" for c in "∆∈√∛≅≠⋅ꞌ\uf7bf\ufffd"}, "\u2126": "ohm",
    **{chr(c): "" for c in range(0x80, 0xa0)},  # C1 controls
    "\u200b": " ", "\u2212": "-", "\u2264": "<=", "\u2265": ">=",
}


def transliterate(text: str) -> str:
    """ASCII text as ``unidecode`` gives it (see the module docstring for where it is equal)."""
    if text.isascii():
        return text
    out = []
    for char in text:
        if char.isascii():
            out.append(char)
        elif char in _TABLE:
            out.append(_TABLE[char])
        else:
            out.extend(_TABLE.get(c, c) for c in unicodedata.normalize("NFKD", char)
                       if not unicodedata.combining(c))
    return "".join(out)


def clean_generation(text: str, *, until: Sequence[str] = (UNTIL,), strip_think: bool = True) -> str:
    """The harness's post-processing of a decoded generation: drop the reasoning up to the
    last ``</think>`` (then strip), then cut at the first stop sequence."""
    if strip_think and THINK_END in text:
        text = text[text.rfind(THINK_END) + len(THINK_END):].strip()
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def _normalize(text: str) -> str:
    text = text.replace("\n", " ").replace("\r", " ").replace("\t", " ")
    text = re.sub(" +", " ", text).strip()
    return transliterate(text)


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
