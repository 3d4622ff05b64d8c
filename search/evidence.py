"""Uncertainty for every score the campaign readers show (status, report, export card, demo).

- An accuracy carries its 95% **Wilson** interval (``evals.stats.wilson_interval``).
- The best (or exported) trial against a baseline is compared **paired**, on the same items:
  the difference in accuracy with Newcombe's 95% interval and the p-value of McNemar's exact
  two-sided test, plus a plain verdict ("better" / "worse" / "not distinguishable at this size").
  Items are pooled over the domains (sorted), as the pruning test pools them.
- The weighted score (what the search maximizes) carries a stratified bootstrap interval and
  is compared paired with the stratified sign-flip test of ``evals.weighted_stats``; see
  ``search.verdicts`` for the held-out verdicts (Holm, intersection-union) and the counts.
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
SELECTED_ON = "selected on these items: no verdict"   # what a dev comparison says instead of a verdict


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


def selection_note(n_trials: int, counts: Mapping[str, Any] | None = None) -> str:
    """The selection note; with ``counts`` (see :func:`search_counts`) it names them all."""
    note = SELECTION_NOTE.format(n=n_trials)
    if counts:
        note += (f" ({counts['trials_searched']} trials searched, {counts['distinct_candidates']} distinct "
                 f"candidates; {counts['exports']} exports, {counts['test_looks']} looks at the test split)")
    return note


# -- the weighted score: intervals, dev comparisons without verdicts, held-out verdicts ---------------

def campaign_weights(study) -> dict[str, float] | None:
    from search.pruning import study_weights

    return study_weights(study)


Groups = Mapping[str, Mapping[str, Sequence[str]]]   # the study's twin groups by stage (T.item_groups)


def groups_for(groups: Groups | None, bits: Mapping[str, Sequence[bool]]) -> Mapping[str, Sequence[str]] | None:
    """The stage's twin groups that label exactly ``bits``' items (the final stage's, else stage
    1's, for a pruned trial), None when none do: every item then counts on its own."""
    from evals.weighted_stats import labels_every_item

    return next((g for g in ((groups or {}).get(s) for s in ("final", "stage1")) if labels_every_item(g, bits)), None)


def trial_score(t: T.FrozenTrial, weights: Mapping[str, float] | None, groups: Groups | None = None
                ) -> dict[str, Any]:
    """``{score, ci95, n}``: the trial's weighted score with its stratified bootstrap interval
    (``groups``: the study's twin groups, ``T.item_groups``; each group resampled whole)."""
    from search.verdicts import score_dict

    bits = T.item_bits(t)
    return score_dict(T.scalar(t), bits, weights, clusters=groups_for(groups, bits))


def trial_score_text(t: T.FrozenTrial, weights: Mapping[str, float] | None, groups: Groups | None = None) -> str:
    from search.verdicts import score_text

    bits = T.item_bits(t)
    return score_text(T.scalar(t), bits, weights, clusters=groups_for(groups, bits))


def dev_vs_baselines(study, best: T.FrozenTrial) -> dict[str, dict[str, Any] | None]:
    """``best`` minus each baseline on the dev items it was selected on: weighted difference,
    interval and p, and "selected on these items: no verdict"."""
    from search.verdicts import dev_comparisons

    others = {T.baseline_label(name): T.item_bits(t) for name, t in T.baselines(study).items()
              if t.number != best.number}
    bits = T.item_bits(best)
    return dev_comparisons(bits, others, campaign_weights(study), clusters=groups_for(T.item_groups(study), bits))


def latest_held_out(directory) -> dict[str, Any] | None:
    """The held-out verdicts of the campaign's latest export (None before any export)."""
    from search.verdicts import export_history

    history = [e for e in export_history(directory) if e.get("verdicts")]
    return history[-1]["verdicts"] if history else None
