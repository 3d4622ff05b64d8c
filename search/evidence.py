"""Uncertainty for every score the campaign readers show (status, report, export card, demo).

- An accuracy carries its 95% **Wilson** interval (``evals.stats.wilson_interval``).
- The best (or exported) trial against a baseline is compared **paired**, on the same items:
  the difference in accuracy with Newcombe's 95% interval and the p-value of McNemar's exact
  two-sided test, plus a plain verdict ("better" / "worse" / "not distinguishable at this size").
  Items are pooled over the domains (sorted), as the pruning test pools them.
- The best dev score of N trials is optimistic: it was *selected* on those very items.
  ``SELECTION_NOTE`` says so wherever a best score is shown; held-out test scores are the
  honest estimate, and the dev -> test gap is shown next to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from evals.stats import PairedComparison, format_comparison, paired_comparison, verdict, wilson_interval
from search import trials as T

SELECTION_NOTE = ("the best dev score of {n} trials is optimistic: it was selected on those dev items, "
                  "so part of its lead is luck of the draw; held-out test scores are the honest estimate")


def accuracy(correct: int, n: int) -> dict[str, Any]:
    """``{acc, n, correct, ci95: [low, high]}`` (Wilson)."""
    low, high = wilson_interval(int(correct), int(n))
    return {"acc": correct / n if n else 0.0, "n": int(n), "correct": int(correct), "ci95": [low, high]}


def accuracy_text(correct: int, n: int) -> str:
    if not n:
        return "-"
    low, high = wilson_interval(int(correct), int(n))
    return f"{correct / n:.3f} [{low:.2f}, {high:.2f}]"


def domain_accuracies(t: T.FrozenTrial) -> dict[str, dict[str, Any]]:
    """Per domain: accuracy with its interval, from the trial's recorded metrics."""
    out = {}
    for d, v in T.domains_of(t).items():
        n = int(v.get("n", 0))
        out[d] = accuracy(round(float(v["acc"]) * n), n)
    return out


def compare(a: Mapping[str, Sequence[bool]], b: Mapping[str, Sequence[bool]]) -> PairedComparison | None:
    """A against B on the items both were scored on (None without per-item evidence)."""
    if not a or not b or sorted(a) != sorted(b) or any(len(a[d]) != len(b[d]) for d in a):
        return None
    return paired_comparison(T.pooled(a), T.pooled(b))


def compare_trials(a: T.FrozenTrial, b: T.FrozenTrial) -> PairedComparison | None:
    return compare(T.item_bits(a), T.item_bits(b))


def comparison_dict(cmp: PairedComparison | None) -> dict[str, Any] | None:
    """The numbers of a comparison, for JSON (``diff``, ``ci95``, ``p_value``, ``verdict``)."""
    if cmp is None:
        return None
    return {"diff": cmp.diff, "ci95": [cmp.low, cmp.high], "p_value": cmp.p_value, "n": cmp.n,
            "only_a": cmp.only_a, "only_b": cmp.only_b, "verdict": verdict(cmp),
            "text": format_comparison(cmp)}


def comparison_text(cmp: PairedComparison | None, *, ascii: bool = False) -> str:
    if cmp is None:
        return "no per-item evidence recorded (trial scored by an older brmerge)"
    return format_comparison(cmp, ascii=ascii)


def best_vs_baselines(study, best: T.FrozenTrial) -> list[tuple[str, T.FrozenTrial, PairedComparison | None]]:
    """(label, baseline trial, best minus baseline) for every completed baseline other than ``best``."""
    return [(T.baseline_label(name), t, compare_trials(best, t))
            for name, t in T.baselines(study).items() if t.number != best.number]


def selection_note(n_trials: int) -> str:
    return SELECTION_NOTE.format(n=n_trials)
