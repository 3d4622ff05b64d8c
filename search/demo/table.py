"""The demo's table: its rows, the claim they support, and how both are printed.

Each accuracy carries its 95% Wilson interval. The claim comes from the held-out **test**
items only (the export's paired, domain-stratified sign-flip tests of the weighted score, Holm
over the three rivals, intersection-union for "beats all": ``search.verdicts``); the dev items
the merge was selected on are compared too, with numbers and no verdict word.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from search.demo.zoo import SPECIALISTS
from search.verdicts import INTERVAL_NOTE

# The demo scores the domains it has a specialist for (the zoo's fine-tunes, in its order);
# each is a ``benchmarks_ptbr.sources`` domain, checked by the tests.
DOMAINS: tuple[str, ...] = tuple(SPECIALISTS)
RIVALS: tuple[str, ...] = (*(f"{d} specialist" for d in DOMAINS), "uniform merge")


@dataclass(frozen=True)
class Row:
    key: str                       # base | legal | health | uniform | best
    name: str
    source: str                    # "direct evaluation" or "study trial"
    domains: dict[str, dict[str, Any]]     # dev: domain -> {acc, gold_prob, n, correct, score, ci95}
    combined: float                # dev weighted score (the search's objective)
    trial: int | None = None
    model: str | None = None
    baseline: str | None = None    # the trial's baseline name, if it was one
    test: dict[str, dict[str, Any]] = field(default_factory=dict)   # test: domain -> {correct, n, acc, ci95}
    test_combined: float | None = None
    items: dict[str, list[bool]] = field(default_factory=dict, repr=False)  # per-item correctness on dev


def rival_label(export_name: str, specialists: Mapping[str, str]) -> str | None:
    """The demo's name of an export baseline row (``uniform``, ``model:<path>``)."""
    if export_name == "uniform":
        return "uniform merge"
    for domain, path in specialists.items():
        if export_name == f"model:{path}":
            return f"{domain} specialist"
    return None


def claim(rows: list[Row], verdicts: Mapping[str, Any], dev: Mapping[str, Any],
          specialists: Mapping[str, str]) -> dict[str, Any]:
    """The held-out verdicts of the export (relabelled for the demo) and the dev comparisons."""
    best = next(r for r in rows if r.key == "best")
    rivals = {rival_label(k, specialists) or k: v for k, v in verdicts["baselines"].items()}
    searched = not best.baseline   # a baseline trial is one of the rivals again, not a find
    # both readings must agree: every one-sided p <= alpha (intersection-union) and every
    # Holm-adjusted two-sided comparison "better" with its interval above 0
    holds = (bool(verdicts["beats_all"]["holds"]) and searched and set(RIVALS) <= set(rivals)
             and all(rivals[name]["verdict"] == "better" for name in RIVALS))
    return {"best_beats_specialists_and_uniform_on_test": holds,
            "best_is_searched": searched,
            "split": verdicts["split"], "alpha": verdicts["alpha"], "test_items": verdicts["n_items"],
            "test_units": verdicts.get("n_units", verdicts["n_items"]),
            "beats_all": verdicts["beats_all"],
            # best minus each rival on the same test items: weighted-score difference [95% CI],
            # two-sided sign-flip p, Holm-adjusted p, verdict
            "test": {name: rivals.get(name) for name in RIVALS},
            # the same on the dev items the merge was selected on: numbers, no verdict
            "dev_selected_on": {rival_label(k, specialists) or k: v for k, v in dev.items()}}


def format_table(rows: list[Row]) -> list[str]:
    head = (f"{'':30}" + "".join(f"{d + ' dev':>20}{d + ' test':>20}" for d in DOMAINS)
            + f"{'dev':>8}{'test':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(_cell(r.domains.get(d)).rjust(20) + _cell(r.test.get(d)).rjust(20) for d in DOMAINS)
        test = f"{r.test_combined:.4f}" if r.test_combined is not None else "-"
        lines.append(f"{r.name[:29]:30}{cells}{r.combined:>8.4f}{test:>8}")
    lines.append("each domain: questions right / scored and the accuracy's 95% Wilson interval; dev, test: "
                 "the weighted score (mean over domains of 0.9 x accuracy + 0.1 x mean gold-letter "
                 "probability; the search maximized the dev one)")
    return lines


def _cell(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "-"
    low, high = entry["ci95"]
    return f"{entry['correct']:>3}/{entry['n']:<3} [{low:.2f},{high:.2f}]"


def verdict_lines(verdict: Mapping[str, Any]) -> list[str]:
    """The held-out verdict sentence, one line per rival, then the dev comparisons (no verdict)."""
    n = verdict["test_items"]
    units = verdict.get("test_units", n)
    n = f"{n} held-out test items" if units == n else f"{n} held-out test items ({units} facts, each counted once)"
    if verdict["best_beats_specialists_and_uniform_on_test"]:
        head = (f"on {n}, the best searched merge beats both specialists and the "
                f"uniform merge (each Holm-adjusted p <= {verdict['alpha']}; the merge "
                f"{verdict['beats_all']['text']})")
    elif not verdict["best_is_searched"]:
        head = (f"the search's best trial is a baseline itself: no searched merge to claim anything for "
                f"({n})")
    else:
        head = (f"on {n}, the best searched merge is NOT shown to beat both "
                f"specialists and the uniform merge (the merge {verdict['beats_all']['text']}); "
                "the per-rival verdicts below are what it shows")
    lines = [head, "best searched merge minus each, on the same test items (weighted score difference "
                   f"[95% CI], sign-flip p, Holm-adjusted over the three; {INTERVAL_NOTE}):"]
    for name, d in verdict["test"].items():
        lines.append(f"  {name}: {d['text'] if d else 'no paired test items'}")
    lines.append("on the dev items it was selected on (no verdict: these items chose it):")
    for name, d in verdict["dev_selected_on"].items():
        lines.append(f"  {name}: {d['text'] if d else 'no paired dev items'}")
    return lines
