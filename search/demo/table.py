"""The demo's table: its rows, the claim they support, and how both are printed.

Each accuracy carries its 95% Wilson interval; the best merge is compared with each rival on
the same questions (``search.evidence``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DOMAINS = ("legal", "health")
# "Beats" means by more than float noise: a specialist's own baseline trial (its task vector at
# weight 1, the other's at 0) scores within ~1e-9 of the specialist itself.
MIN_MARGIN = 1e-6


@dataclass(frozen=True)
class Row:
    key: str                       # base | legal | health | uniform | best
    name: str
    source: str                    # "direct evaluation" or "study trial"
    domains: dict[str, dict[str, Any]]     # domain -> {acc, gold_prob, n, correct, score, ci95}
    combined: float
    trial: int | None = None
    model: str | None = None
    baseline: str | None = None    # the trial's baseline name, if it was one
    items: dict[str, list[bool]] = field(default_factory=dict, repr=False)  # per-item correctness on dev


def claim(rows: list[Row]) -> dict[str, Any]:
    """Does the best searched merge beat both specialists and the uniform merge (combined)?"""
    by = {r.key: r for r in rows}
    best = by["best"]
    rivals = {"legal specialist": by["legal"], "health specialist": by["health"],
              "uniform merge": by["uniform"]}
    margins = {name: best.combined - r.combined for name, r in rivals.items()}
    correct = {name: sum(best.domains[d]["correct"] for d in DOMAINS)
               - sum(r.domains[d]["correct"] for d in DOMAINS) for name, r in rivals.items()}
    from search.evidence import compare, comparison_dict

    paired = {name: comparison_dict(compare(best.items, r.items)) for name, r in rivals.items()}
    searched = not best.baseline  # a baseline trial is one of the rivals again, not a find
    return {"best_beats_specialists_and_uniform": searched and all(m > MIN_MARGIN for m in margins.values()),
            "best_is_searched": searched, "combined_margins": margins, "more_questions_right": correct,
            "questions": sum(int(best.domains[d]["n"]) for d in DOMAINS),
            # best minus each rival on the same dev items: difference [95% CI], McNemar exact p
            "paired": paired}


def format_table(rows: list[Row]) -> list[str]:
    head = f"{'':34}" + "".join(f"{d:>26}" for d in DOMAINS) + f"{'combined':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(_cell(r.domains[d]).rjust(26) for d in DOMAINS)
        lines.append(f"{r.name[:33]:34}{cells}{r.combined:>11.4f}")
    lines.append("each domain: questions right / scored, the accuracy's 95% Wilson interval, then 0.9 x "
                 "accuracy + 0.1 x mean gold-letter probability; combined: the mean of the two (the "
                 "search's objective)")
    return lines


def _cell(entry: Mapping[str, Any]) -> str:
    low, high = entry["ci95"]
    return f"{entry['correct']:>2}/{entry['n']:<2} [{low:.2f}, {high:.2f}] {entry['score']:.3f}"


def paired_lines(verdict: Mapping[str, Any]) -> list[str]:
    """The best merge minus each rival, paired on the same dev items."""
    from search.evidence import comparison_text

    lines = ["best searched merge minus each, on the same dev questions (accuracy difference "
             "[95% CI], McNemar exact p):"]
    for name, d in verdict["paired"].items():
        lines.append(f"  {name}: {d['text'] if d else comparison_text(None)}")
    return lines


def verdict_line(verdict: Mapping[str, Any]) -> str:
    margins = ", ".join(f"{name} {m:+.4f} ({verdict['more_questions_right'][name]:+d} questions)"
                        for name, m in verdict["combined_margins"].items())
    if verdict["best_beats_specialists_and_uniform"]:
        return f"the best searched merge beats both specialists and the uniform merge: {margins}"
    return ("the best searched merge does NOT beat both specialists and the uniform merge this time: "
            f"{margins}")
