"""When a candidate stops after stage 1: in the bottom quarter *and* significantly worse.

Staged evaluation scores every candidate on a small stage-1 item set first. A candidate stops
there only when all hold:

0. it is not a baseline: baselines are never pruned (every comparison needs them complete);
1. its stage-1 score is below the 25th percentile of the stage-1 scores recorded before it
   (``numpy.percentile``, linear interpolation): a candidate at or above that percentile is
   never pruned;
2. it is worse than the incumbent on the *same* stage-1 items by the one-sided, domain-
   stratified paired sign-flip test of the **weighted** score (``evals.weighted_stats``: the
   quantity the search maximizes, domain weights included) at level ``alpha`` (default 0.05).
   Only correctness counts: per-item gold probabilities are not recorded, so the tie-break
   part of the score is left out of the test. Items of one twin group (the data's ``pair_id``,
   as the worker reports it) flip together: a fact asked twice is one unit of evidence.

**The incumbent is chosen on items outside stage 1.** The best trial by its full score was
selected partly *on* the stage-1 items (they are a subset of the full set), so its stage-1
results carry its winner's luck and every challenger looks worse than it is: pruning would be
biased against challengers. :func:`incumbent` ranks the complete trials by their weighted
accuracy on the final-stage items that stage 1 does not score; when there are none (stage 1
scores every item), it compares against a fixed reference instead, the uniform baseline (or
the first baseline), chosen before any result was seen.

**Audit.** A seeded share (``eval.prune_audit``, default 5%) of the candidates the rule would
prune is scored in full anyway and marked audited; ``search.pruning_audit`` reports how many
of them did at least as well as their incumbent on the items outside stage 1.

With ``n`` discordant items all against the candidate, the smallest one-sided p is about
``0.5 ** n``: the test can fire only on at least ``min_items_for_significance(alpha)`` items
(5 at 0.05), and in practice needs several times more.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

PERCENTILE = 25.0     # "bottom quarter": the rule, and what the old comment promised
DEFAULT_ALPHA = 0.05
DEFAULT_AUDIT = 0.05  # share of would-be-pruned candidates scored in full: cheap, and enough to notice bias
MIN_EARLIER = 4       # fewer earlier stage-1 scores give no meaningful quarter: never prune
FLAT = "items"        # the domain name a flat list of items is given (older callers, tests)


@dataclass(frozen=True)
class PruneDecision:
    prune: bool
    reason: str
    threshold: float | None = None   # the 25th percentile of the earlier stage-1 scores
    p_value: float | None = None     # one-sided sign-flip test, candidate worse than incumbent
    incumbent: int | None = None     # the incumbent's trial number
    n: int | None = None             # stage-1 items compared
    discordant: int | None = None    # of which the two scored differently
    audited: bool = False            # would be pruned, but scored in full for the audit
    units: int | None = None         # independent units the test flipped (twin groups count once)

    def to_attr(self) -> dict[str, object]:
        return {"prune": self.prune, "reason": self.reason, "threshold": self.threshold,
                "p_value": self.p_value, "incumbent": self.incumbent, "n": self.n,
                "discordant": self.discordant, "audited": self.audited, "units": self.units}

    def audit(self) -> "PruneDecision":
        """Not pruned after all: scored in full for the pruning audit (``prune`` False, ``audited`` True)."""
        return replace(self, prune=False, audited=True, reason=self.reason + "; audited: scored in full")


def min_items_for_significance(alpha: float) -> int:
    from evals.stats import min_items_for_significance as exact_min

    return exact_min(alpha)


def _by_domain(x: Mapping[str, Sequence[bool]] | Sequence[bool]) -> dict[str, list[bool]]:
    if isinstance(x, Mapping):
        return {d: [bool(v) for v in vals] for d, vals in x.items()}
    return {FLAT: [bool(v) for v in x]}


def decide(score: float, correct: Mapping[str, Sequence[bool]] | Sequence[bool], *, earlier: Sequence[float],
           incumbent_correct: Mapping[str, Sequence[bool]] | Sequence[bool] | None, incumbent: int | None = None,
           alpha: float = DEFAULT_ALPHA, weights: Mapping[str, float] | None = None,
           baseline: bool = False, clusters: Mapping[str, Sequence[str]] | None = None) -> PruneDecision:
    """Prune a candidate with stage-1 ``score`` and per-item ``correct`` ({domain: items}, or
    one flat list)? ``earlier``: the stage-1 scores recorded before this candidate's;
    ``incumbent_correct``: the incumbent's stage-1 correctness, same layout and item order (None:
    no incumbent); ``weights``: the campaign's domain weights (None: equal); ``clusters``: each
    item's twin group, same layout (ignored unless it labels every item)."""
    from evals.weighted_stats import labels_every_item, sign_flip_p, units

    if baseline:
        return PruneDecision(False, "baselines are never pruned")
    if len(earlier) < MIN_EARLIER:
        return PruneDecision(False, f"only {len(earlier)} earlier stage-1 scores (need {MIN_EARLIER})")
    threshold = float(np.percentile(np.asarray(earlier, dtype=float), PERCENTILE))
    if not score < threshold:
        return PruneDecision(False, "not in the bottom quarter of the earlier stage-1 scores", threshold)
    if incumbent_correct is None:
        return PruneDecision(False, "bottom quarter, but no incumbent to compare with", threshold)
    mine, theirs = _by_domain(correct), _by_domain(incumbent_correct)
    if sorted(mine) != sorted(theirs) or any(len(mine[d]) != len(theirs[d]) for d in mine):
        return PruneDecision(False, "bottom quarter, but the incumbent was scored on other items",
                             threshold, incumbent=incumbent)
    w = {d: 1.0 for d in mine} if weights is None else {d: float(weights.get(d, 0.0)) for d in mine}
    if not any(v > 0 for v in w.values()):
        return PruneDecision(False, "bottom quarter, but no stage-1 domain has a weight", threshold)
    n = sum(len(mine[d]) for d in mine if w[d] > 0)
    discordant = sum(a != b for d in mine if w[d] > 0 for a, b in zip(mine[d], theirs[d]))
    clusters = clusters if labels_every_item(clusters, mine) else None
    # H1: the candidate's weighted score is lower
    _, p_less, _, _ = sign_flip_p(mine, theirs, w, clusters=clusters)
    p = float(p_less)
    k = units(mine, w, clusters)
    grouped = f", {k} independent units" if k != n else ""
    if p <= alpha:
        return PruneDecision(True, f"bottom quarter and worse than trial {incumbent} on the weighted score "
                                   f"({discordant} of {n} items differ{grouped}, p = {p:.3g} <= {alpha})",
                             threshold, p, incumbent, n, discordant, units=k)
    return PruneDecision(False, f"bottom quarter, but not significantly worse than trial {incumbent} "
                                f"(p = {p:.3g} > {alpha}{grouped})", threshold, p, incumbent, n, discordant,
                         units=k)


def audit_draw(trial_number: int, share: float, *, seed: int = 0) -> bool:
    """Is this would-be-pruned trial scored in full for the audit? A draw seeded by the trial's
    number (and the campaign's seed): the same on every run and on resume, no shared state."""
    if share <= 0:
        return False
    return random.Random(f"prune-audit:{seed}:{trial_number}").random() < share


def study_weights(study) -> dict[str, float] | None:
    """The campaign's positive domain weights, from the study's record (None if not recorded)."""
    from search import trials as T

    objectives = T.campaign_attr(study).get("objectives") or {}
    w = {d: float(v) for d, v in objectives.items() if isinstance(v, (int, float)) and v > 0}
    return w or None


def outside_mask(lists: Mapping[str, Mapping[str, Sequence[str]]] | None) -> dict[str, list[bool]] | None:
    """Per domain, which final-stage items stage 1 does not score, from the stored item lists
    (``{"stage1"|"final": {domain: [ids]}}``); None unless both are known and some item is outside."""
    stage1, final = (lists or {}).get("stage1"), (lists or {}).get("final")
    if not stage1 or not final:
        return None
    mask = {d: [i not in set(stage1.get(d, ())) for i in ids] for d, ids in final.items()}
    return mask if any(any(m) for m in mask.values()) else None


def outside_stage1(study) -> dict[str, list[bool]] | None:
    from search import trials as T

    return outside_mask(T.item_lists(study))


def outside_score(bits: Mapping[str, Sequence[bool]], mask: Mapping[str, Sequence[bool]],
                  weights: Mapping[str, float] | None) -> float | None:
    """Weighted accuracy on the masked items (None when no weighted domain has one)."""
    num = den = 0.0
    for d, m in mask.items():
        w = 1.0 if weights is None else float(weights.get(d, 0.0))
        vals = [bool(b) for b, keep in zip(bits.get(d, ()), m) if keep]
        if w > 0 and vals and len(bits.get(d, ())) == len(m):
            num += w * sum(vals) / len(vals)
            den += w
    return num / den if den else None


def incumbent_key(items: Mapping[str, Sequence[bool]], *, mask: Mapping[str, Sequence[bool]] | None,
                  weights: Mapping[str, float] | None, baseline: str | None) -> float | None:
    """How a fully scored trial ranks as the incumbent (higher wins, ties to the lower trial
    number), None when it cannot be one: its weighted accuracy on the items outside stage 1; with
    no such items, the fixed reference — the uniform baseline, else the first baseline."""
    if mask is not None:
        return outside_score(items, mask, weights)
    if baseline:
        return 1.0 if baseline == "uniform" else 0.0
    return None


def incumbent(study) -> tuple[int | None, float | None, dict[str, list[bool]] | None]:
    """(number, ranking key, stage-1 correctness by domain) of the trial a candidate's stage 1
    is compared with (see :func:`incumbent_key`), or ``(None, None, None)``."""
    from search import trials as T

    weights, mask = study_weights(study), outside_stage1(study)
    best = None
    for t in study.get_trials(deepcopy=False):
        if T.scalar(t) is None or not T.has_items(t, stage1=True):
            continue
        key = incumbent_key(T.item_bits(t), mask=mask, weights=weights, baseline=T.baseline_name(t))
        if key is not None and (best is None or key > best[1]):
            best = (t.number, key, t)
    if best is None:
        return None, None, None
    return best[0], best[1], T.item_bits(best[2], stage1=True)
