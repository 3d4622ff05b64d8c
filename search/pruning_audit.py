"""How well stage-1 pruning worked in a campaign: share pruned, power, and the audit's result.

- **share pruned**: trials stopped after stage 1 among those with a stage-1 decision (cached
  copies of an earlier trial are not counted again).
- **power of stage 1**: the chance that the test stops a candidate ``effect`` worse than the
  incumbent (default 0.05, five points of accuracy), on the stage-1 item count, at the
  disagreement rate the campaign's decisions observed (share of stage-1 items on which the
  candidate and the incumbent differed). Computed exactly for the one-sided exact McNemar
  test on pooled items, which is what the weighted sign-flip test is with equal domain weights;
  it ignores the bottom-quarter condition, so it is an upper bound of the real chance. Where
  items come in twin groups (a fact asked twice), the test counts each group once, and the
  power is computed on the groups as if each were one item (exact when twins are answered
  alike). Below 50% stage 1 mostly lets worse candidates through (it costs compute, not
  correctness).
- **audit**: a seeded share of would-be prunes was scored in full (``eval.prune_audit``). A
  *false prune* is an audited candidate whose weighted accuracy on the final-stage items that
  stage 1 does not score is at least its incumbent's. The test keeps P(prune | not worse) <= alpha;
  the audit's rate is P(not worse on fresh items | would be pruned), a different ratio, but
  one that stays near 0 when pruning stops only worse candidates and rises towards 1/2 when it
  stops candidates as good as the incumbent (the bias of an incumbent selected on stage 1's items).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from search import pruning
from search import trials as T

DEFAULT_EFFECT = 0.05      # the gap power is quoted for: five points of accuracy, a gap users care about
POWER_WARNING = 0.5        # below this, say that stage 1 rarely stops a worse candidate


def stage1_power(n: int, disagreement: float, *, effect: float = DEFAULT_EFFECT,
                 alpha: float = pruning.DEFAULT_ALPHA) -> float:
    """P(one-sided exact McNemar p <= alpha) on ``n`` items when the two models differ on a share
    ``disagreement`` of the items and the candidate is ``effect`` worse: the number of discordant
    items is Binomial(n, r) with ``r = max(disagreement, effect)``, and each discordant item goes
    the candidate's way with probability ``(r - effect) / (2r)``."""
    r = min(1.0, max(float(disagreement), float(effect)))
    if n <= 0 or r <= 0:
        return 0.0
    q = (r - effect) / (2 * r)
    lf = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, n + 1)))])    # log k!, k = 0..n
    power = 0.0
    for m in range(1, n + 1):
        k = np.arange(m + 1)
        log_comb = lf[m] - lf[k] - lf[m - k]
        half_cdf = np.cumsum(np.exp(log_comb - m * math.log(2.0)))
        crit = int(np.searchsorted(half_cdf, alpha * (1 + 1e-12), side="right")) - 1  # last w with cdf <= alpha
        if crit < 0:
            continue
        log_pm = lf[n] - lf[m] - lf[n - m] + m * math.log(r) + ((n - m) * math.log(1 - r) if r < 1 else
                                                              (0.0 if m == n else -math.inf))
        if q <= 0:
            p_w = 1.0
        else:
            w = k[:crit + 1]
            p_w = float(np.exp(log_comb[:crit + 1] + w * math.log(q) + (m - w) * math.log(1 - q)).sum())
        power += math.exp(log_pm) * p_w
    return min(1.0, power)


def summary(study, *, effect: float = DEFAULT_EFFECT) -> dict[str, Any] | None:
    """The campaign's pruning in numbers (None when no trial had a stage-1 decision)."""
    ev = T.campaign_attr(study).get("eval") or {}
    alpha = float(ev.get("prune_alpha") or pruning.DEFAULT_ALPHA)
    share = ev.get("prune_audit", pruning.DEFAULT_AUDIT)
    views = [T.view(t) for t in study.get_trials(deepcopy=False)]
    views = [v for v in views if v.prune and not v.interrupted and v.cached_from is None]
    trials = [v.frozen for v in views]
    if not trials:
        return None
    decisions = {v.number: v.prune for v in views}
    pruned = [t for t in trials if t.state == T.TrialState.PRUNED]
    tested = [d for d in decisions.values() if d.get("n") and d.get("discordant") is not None]
    n_items = max((int(d["n"]) for d in tested), default=0)
    n_units = max((int(d.get("units") or d["n"]) for d in tested), default=0)   # twin groups count once
    rate = sum(int(d["discordant"]) for d in tested) / sum(int(d["n"]) for d in tested) if tested else None
    power = stage1_power(n_units, rate, effect=effect, alpha=alpha) if rate is not None else None
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    mask, weights = pruning.outside_stage1(study), pruning.study_weights(study)
    audited, false = 0, 0
    for t in trials:
        d = decisions[t.number]
        inc = by_number.get(d.get("incumbent")) if d.get("incumbent") is not None else None
        if not d.get("audited") or t.state != T.TrialState.COMPLETE or inc is None or T.scalar(inc) is None:
            continue
        keep = mask or {dom: [True] * len(v) for dom, v in T.item_bits(t).items()}
        mine = pruning.outside_score(T.item_bits(t), keep, weights)
        theirs = pruning.outside_score(T.item_bits(inc), keep, weights)
        if mine is None or theirs is None:
            continue
        audited += 1
        false += mine >= theirs
    return {"stage1_decisions": len(trials), "pruned": len(pruned), "share_pruned": len(pruned) / len(trials),
            "stage1_items": n_items, "stage1_units": n_units, "disagreement_rate": rate,
            "power": power, "power_effect": effect,
            "power_warning": power is not None and power < POWER_WARNING, "alpha": alpha,
            "audit_share": share, "audited": audited, "false_prunes": false,
            "false_prune_rate": false / audited if audited else None,
            "audit_on": "items outside stage 1" if mask else "all final-stage items (stage 1 scores them all)"}


def _items(s: dict[str, Any]) -> str:
    units = s.get("stage1_units", s["stage1_items"])
    return f"{s['stage1_items']} items" + (f", {units} independent units" if units != s["stage1_items"] else "")


def lines(s: dict[str, Any] | None) -> list[str]:
    """The summary as text for ``status`` and the report."""
    if s is None:
        return ["pruning: no stage-1 decisions (staging off, or nothing scored yet)"]
    out = [f"pruning: {s['pruned']} of {s['stage1_decisions']} candidates stopped after stage 1 "
           f"({100 * s['share_pruned']:.1f}%); baselines are never pruned"]
    if s["power"] is None:
        out.append("power of stage 1: unknown (no decision compared a candidate with an incumbent yet)")
    else:
        out.append(f"power of stage 1: {s['power']:.2f} to stop a candidate {s['power_effect']:.2f} worse "
                   f"({_items(s)}, observed disagreement rate {s['disagreement_rate']:.2f}, "
                   f"alpha {s['alpha']})")
        if s["power_warning"]:
            out.append(f"WARNING: stage 1 has under {POWER_WARNING:.0%} power: most worse candidates are scored "
                       "in full anyway; raise eval.stage1 to save compute")
    if s["audited"]:
        out.append(f"pruning audit: {s['audited']} would-be prunes scored in full ({s['audit_share']:.0%} drawn); "
                   f"{s['false_prunes']} did at least as well as their incumbent on {s['audit_on']} "
                   f"(false-prune rate {s['false_prune_rate']:.2f}; test level alpha {s['alpha']})")
    else:
        out.append(f"pruning audit: no would-be prune scored in full yet ({s['audit_share']:.0%} are drawn)")
    return out
