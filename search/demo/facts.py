"""The demo's own item set: synthetic facts, each asked in other words on dev and on test.

Written programmatically for the demo (not exam questions, not true of the world): every
domain has ``facts`` made-up subjects (a law, a syndrome) with one value each out of four.

- **Prose** states each fact once ("A lei Tarvona fixa o prazo de 15 dias."): training text.
- **Dev questions** ask each fact in the ``DEV`` phrasings; **test questions** ask the same
  facts in the ``TEST`` phrasings, whose words differ from every dev phrasing. A specialist is
  fine-tuned on its domain's prose and answered dev questions; test measures whether what it
  learned carries over to questions it never saw, worded differently.
- The four options of a domain are listed in the same order (unless ``shuffled``, a variant
  kept for ``perf/zoo_merges.py``), so a fact's answer letter is the same in every phrasing:
  what must carry over is "this subject -> this answer". A fact's questions share one
  ``pair_id``: the held-out tests count the fact once, not once per wording.
- **Format subjects** (disjoint from the facts) give the base model questions in every
  phrasing with random answer letters: it learns the format, never an answer.

The items use the project's JSONL item schema and are written into a data directory in the
loader's layout (:func:`write_data_dir`); dev and test are told apart by the year, as the
loader's split table does for real exams (``DEV_YEAR``/``TEST_YEAR`` below).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

LABELS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class DomainFacts:
    folder: str                 # the loader's data folder for this domain (benchmarks_ptbr.sources)
    dev_year: int               # a year of that folder's dev split
    test_year: int              # a year of that folder's test split
    subject: str                # "{}" is the made-up name
    values: tuple[str, ...]     # the four options, always in this order
    prose: str                  # "{s}" subject, "{v}" value
    dev: tuple[str, ...]        # question phrasings of the dev split
    test: tuple[str, ...]       # question phrasings of the test split (other words)


DOMAIN_FACTS: dict[str, DomainFacts] = {
    "legal": DomainFacts(
        folder="oab_exams", dev_year=2010, test_year=2015, subject="lei {}",
        values=("5 dias", "10 dias", "15 dias", "30 dias"),
        prose="A {s} fixa o prazo de {v}.",
        dev=("Qual é o prazo previsto na {s}?", "Segundo a {s}, o prazo é de quanto tempo?"),
        test=("A {s} estabelece um prazo de:", "Em quantos dias vence o prazo fixado pela {s}?")),
    "health": DomainFacts(
        folder="revalida", dev_year=2017, test_year=2022, subject="síndrome de {}",
        values=("repouso", "antibiótico", "vacina", "cirurgia"),
        prose="Para a {s}, indica-se {v}.",
        dev=("Qual é o tratamento indicado para a {s}?", "Como se trata a {s}?"),
        test=("Na {s}, a conduta recomendada é:", "O paciente com {s} deve receber qual tratamento?")),
}

_ONSETS = ("b", "c", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "br", "tr", "qu")
_ONSETS_B = ("ch", "lh", "nh", "x", "z", "j", "gr", "pr", "cr", "fr", "pl", "cl", "bl", "dr", "gl", "vr")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "", "", "n", "r", "s", "l")


@dataclass(frozen=True)
class Fact:
    domain: str
    index: int
    subject: str                # "lei Tarvona"
    answer: int                 # index into the domain's values
    shuffled: bool = False      # options listed in an order of each question's own

    @property
    def value(self) -> str:
        return DOMAIN_FACTS[self.domain].values[self.answer]


def _names(rng: random.Random, count: int, taken: set[str], onsets: tuple[str, ...] = _ONSETS) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        name = "".join(rng.choice(onsets) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(rng.randint(2, 3))).capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def make_facts(*, facts: int, format_subjects: int, seed: int = 0, disjoint: bool = False,
               shuffled: bool = False) -> tuple[dict[str, list[Fact]], dict[str, list[str]]]:
    """``facts`` facts per domain (answers balanced over the four values) and
    ``format_subjects`` other subjects per domain for the base's format questions."""
    rng = random.Random(seed)
    taken: set[str] = set()
    out, fmt = {}, {}
    for position, (domain, spec) in enumerate(DOMAIN_FACTS.items()):
        onsets = (_ONSETS, _ONSETS_B)[position] if disjoint else _ONSETS
        names = _names(rng, facts + format_subjects, taken, onsets)
        answers = [k % len(LABELS) for k in range(facts)]
        rng.shuffle(answers)
        out[domain] = [Fact(domain, i, spec.subject.format(n), a, shuffled)
                       for i, (n, a) in enumerate(zip(names[:facts], answers))]
        fmt[domain] = [spec.subject.format(n) for n in names[facts:]]
    return out, fmt


def prose(fact: Fact) -> str:
    spec = DOMAIN_FACTS[fact.domain]
    return spec.prose.format(s=fact.subject, v=fact.value)


def order(subject: str, phrasing: str, shuffled: bool) -> tuple[int, ...]:
    """The values' indices in the order the options list them."""
    if not shuffled:
        return tuple(range(len(LABELS)))
    out = list(range(len(LABELS)))
    random.Random(hashlib.sha256(f"{subject}|{phrasing}".encode()).hexdigest()).shuffle(out)
    return tuple(out)


def question(domain: str, subject: str, phrasing: str, shuffled: bool = False) -> dict:
    """A schema row without id/answer/year: the question and its four options."""
    values = DOMAIN_FACTS[domain].values
    return {"question": phrasing.format(s=subject),
            "choices": [{"label": k, "text": values[i]}
                        for k, i in zip(LABELS, order(subject, phrasing, shuffled))]}


def letter(subject: str, phrasing: str, answer: int, shuffled: bool = False) -> str:
    return LABELS[order(subject, phrasing, shuffled).index(answer)]


def rows(facts: dict[str, list[Fact]], split: str) -> dict[str, list[dict]]:
    """Every fact asked in every phrasing of ``split``, as item-schema rows per domain."""
    out: dict[str, list[dict]] = {}
    for domain, items in facts.items():
        spec = DOMAIN_FACTS[domain]
        phrasings = spec.dev if split == "dev" else spec.test
        out[domain] = [
            {"id": f"demo-{domain}-{split}-{f.index:04d}-{p}",
             **question(domain, f.subject, phrasing, f.shuffled),
             "answerKey": letter(f.subject, phrasing, f.answer, f.shuffled),
             "year": spec.dev_year if split == "dev" else spec.test_year,
             # one fact's wordings are one twin group: a held-out test counts the fact once
             "pair_id": f"demo-{domain}-{f.index:04d}",
             "usable_text_only": True, "source_note": "synthetic fact written by brmerge's demo"}
            for f in items for p, phrasing in enumerate(phrasings)]
    return out


def write_data_dir(facts: dict[str, list[Fact]], folder: Path) -> Path:
    """The dev and test rows as ``<folder>/<domain folder>/derived/demo.jsonl``."""
    for domain in facts:
        path = Path(folder) / DOMAIN_FACTS[domain].folder / "derived" / "demo.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(r, ensure_ascii=False) for s in ("dev", "test") for r in rows(facts, s)[domain]]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return Path(folder)


def digest(facts: dict[str, list[Fact]]) -> str:
    h = hashlib.sha256()
    for domain, items in sorted(facts.items()):
        spec = DOMAIN_FACTS[domain]
        h.update(json.dumps([spec.prose, spec.dev, spec.test, spec.values]).encode())
        for f in items:
            h.update(f"{domain}|{f.subject}|{f.answer}".encode())
    return h.hexdigest()[:16]
