"""What a campaign has done so far: best trials, baselines, progress, throughput."""

from __future__ import annotations

from typing import Any

import optuna

from search import trials as T
from search.trials import baselines, best_trials, scalar, trial_label

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def domain_row(t: optuna.trial.FrozenTrial, domains: list[str]) -> list[str]:
    doms = t.user_attrs.get(T.A_DOMAINS, {})
    return [f"{doms[d]['acc']:.3f}" if d in doms else "-" for d in domains]


def summary_lines(study: optuna.Study, *, k: int = 5) -> list[str]:
    trials = study.get_trials(deepcopy=False)
    interrupted = sum(bool(t.user_attrs.get(T.A_INTERRUPTED)) for t in trials)
    counts = {s: sum(t.state.name == s and not t.user_attrs.get(T.A_INTERRUPTED) for t in trials)
              for s in STATES}
    campaign = study.user_attrs.get("campaign", {})
    budget = (campaign.get("budget") or {}).get("trials", "?")
    domains = list((campaign.get("objectives") or {}).keys()) or ["legal", "health", "enem"]
    lines = [f"progress: {len(T.finished_trials(study))}/{budget} trials "
             + ", ".join(f"{s.lower()} {counts[s]}" for s in STATES if counts[s])
             + (f" (+{interrupted} interrupted, re-run)" if interrupted else "")]
    # the study's own clocks cover ask and tell too, not only the worker's part
    times = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in trials
             if t.datetime_start and t.datetime_complete and not t.user_attrs.get(T.A_INTERRUPTED)]
    if times:
        span = max(b for _, b in times) - min(a for a, _ in times)
        busy = sum(b - a for a, b in times)
        evals = [t.user_attrs.get(T.A_EVAL, 0) for t in trials if T.A_EVAL in t.user_attrs]
        lines.append(f"throughput: {len(times) / span * 3600 if span > 0 else 0:.0f} trials/hour; "
                     f"mean trial {busy / len(times):.1f} s, mean evaluation "
                     f"{(sum(evals) / len(evals)) if evals else 0:.1f} s")
    header = f"{'trial':<28}{'score':>8}  " + "".join(f"{d:>9}" for d in domains)
    lines.append(header)
    shown = set()
    for name, t in baselines(study).items():
        lines.append(f"{trial_label(t)[:27]:<28}{scalar(t):>8.4f}  " + "".join(f"{v:>9}" for v in domain_row(t, domains)))
        shown.add(t.number)
    lines.append("best:")
    for t in best_trials(study, k):
        lines.append(f"{trial_label(t)[:27]:<28}{scalar(t):>8.4f}  " + "".join(f"{v:>9}" for v in domain_row(t, domains)))
    return lines


def status_dict(study: optuna.Study) -> dict[str, Any]:
    best = best_trials(study, 1)
    return {"finished": len(T.finished_trials(study)),
            "best_trial": best[0].number if best else None,
            "best_score": scalar(best[0]) if best else None,
            "baselines": {n: scalar(t) for n, t in baselines(study).items()}}
