"""When a candidate stops after stage 1: in the bottom quarter *and* significantly worse.

Staged evaluation scores every candidate on a small stage-1 item set first. A candidate stops
there only when both hold:

1. its stage-1 score is below the 25th percentile of the stage-1 scores recorded before it
   (``numpy.percentile``, linear interpolation): a candidate at or above that percentile is
   never pruned;
2. it is worse than the incumbent (the best fully scored trial so far) on the *same* stage-1
   items by a one-sided exact McNemar test at level ``alpha`` (default 0.05). Items are pooled
   over the domains; only correctness counts (the gold-letter probability is a tie-break of
   the score, not evidence).

Neither rule alone is enough: a percentile alone prunes on noise when stage 1 has a handful
of items (the fault of the old ``PercentilePruner(25.0)``, which in Optuna *keeps* the top 25%
and so pruned three candidates in four); a test alone would stop candidates that are worse
than the best but still better than most.

With ``n`` discordant items all against the candidate, the exact one-sided p-value is
``0.5 ** n``: the test can fire only when ``0.5 ** n <= alpha``, i.e. on at least
``min_items_for_significance(alpha)`` items (5 at 0.05). Stage 1 must score at least that many
items, and in practice several times more, since most items are concordant.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PERCENTILE = 25.0     # "bottom quarter": the rule, and what the old comment promised
DEFAULT_ALPHA = 0.05
MIN_EARLIER = 4       # fewer earlier stage-1 scores give no meaningful quarter: never prune


@dataclass(frozen=True)
class PruneDecision:
    prune: bool
    reason: str
    threshold: float | None = None   # the 25th percentile of the earlier stage-1 scores
    p_value: float | None = None     # one-sided exact McNemar, candidate worse than incumbent
    incumbent: int | None = None     # the incumbent's trial number

    def to_attr(self) -> dict[str, object]:
        return {"prune": self.prune, "reason": self.reason, "threshold": self.threshold,
                "p_value": self.p_value, "incumbent": self.incumbent}


def min_items_for_significance(alpha: float) -> int:
    from evals.stats import min_items_for_significance as exact_min

    return exact_min(alpha)


def decide(score: float, correct: Sequence[bool], *, earlier: Sequence[float],
           incumbent_correct: Sequence[bool] | None, incumbent: int | None = None,
           alpha: float = DEFAULT_ALPHA) -> PruneDecision:
    """Prune a candidate with stage-1 ``score`` and per-item ``correct``?

    ``earlier``: the stage-1 scores recorded before this candidate's; ``incumbent_correct``:
    the incumbent's stage-1 per-item correctness, in the same item order (None: no incumbent).
    """
    from evals.stats import mcnemar_exact

    if len(earlier) < MIN_EARLIER:
        return PruneDecision(False, f"only {len(earlier)} earlier stage-1 scores (need {MIN_EARLIER})")
    threshold = float(np.percentile(np.asarray(earlier, dtype=float), PERCENTILE))
    if not score < threshold:
        return PruneDecision(False, "not in the bottom quarter of the earlier stage-1 scores", threshold)
    if incumbent_correct is None:
        return PruneDecision(False, "bottom quarter, but no incumbent to compare with", threshold)
    if len(incumbent_correct) != len(correct):
        return PruneDecision(False, "bottom quarter, but the incumbent was scored on other items",
                             threshold, incumbent=incumbent)
    # b: the incumbent right where the candidate is wrong; c: the reverse
    b = sum(1 for x, y in zip(correct, incumbent_correct) if y and not x)
    c = sum(1 for x, y in zip(correct, incumbent_correct) if x and not y)
    p = float(mcnemar_exact(c, b, alternative="less"))  # H1: the candidate wins fewer of the discordant items
    if p <= alpha:
        return PruneDecision(True, f"bottom quarter and worse than trial {incumbent} "
                                   f"({b} vs {c} discordant items, p = {p:.3g} <= {alpha})",
                             threshold, p, incumbent)
    return PruneDecision(False, f"bottom quarter, but not significantly worse than trial {incumbent} "
                                f"(p = {p:.3g} > {alpha})", threshold, p, incumbent)


def incumbent(study) -> tuple[int | None, list[bool] | None]:
    """The best fully scored trial so far and its stage-1 per-item correctness (pooled over
    the domains, sorted), or ``(None, None)``."""
    from search import trials as T

    best = T.best_trials(study, 1)
    if not best:
        return None, None
    bits = T.item_bits(best[0], stage1=True)
    return best[0].number, (T.pooled(bits) if bits else None)
