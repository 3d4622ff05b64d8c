"""What a campaign has done so far: best trials, baselines, progress, throughput."""

from __future__ import annotations

from typing import Any

import optuna

from search import evidence as E
from search import trials as T
from search.trials import baselines, best_trials, scalar, trial_label

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def domain_row(t: optuna.trial.FrozenTrial, domains: list[str]) -> list[str]:
    """Each domain's accuracy with its 95% Wilson interval, e.g. ``0.611 [0.39, 0.80]``."""
    accs = E.domain_accuracies(t)
    return [E.accuracy_text(accs[d]["correct"], accs[d]["n"]) if d in accs else "-" for d in domains]


def _row(t: optuna.trial.FrozenTrial, domains: list[str]) -> str:
    return f"{trial_label(t)[:27]:<28}{scalar(t):>8.4f}  " + "".join(f"{v:>21}" for v in domain_row(t, domains))


def summary_lines(study: optuna.Study, *, k: int = 5) -> list[str]:
    trials = study.get_trials(deepcopy=False)
    interrupted = sum(T.interrupted(t) for t in trials)
    counts = {s: sum(t.state.name == s and not T.interrupted(t) for t in trials) for s in STATES}
    campaign = T.campaign_attr(study)
    budget = (campaign.get("budget") or {}).get("trials", "?")
    domains = list((campaign.get("objectives") or {}).keys()) or ["legal", "health", "enem"]
    finished = len(T.finished_trials(study))
    lines = [f"progress: {finished}/{budget} trials "
             + ", ".join(f"{s.lower()} {counts[s]}" for s in STATES if counts[s])
             + (f" (+{interrupted} interrupted, re-run)" if interrupted else "")]
    # the study's own clocks cover ask and tell too, not only the worker's part
    times = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in trials
             if t.datetime_start and t.datetime_complete and not T.interrupted(t)]
    if times:
        span = max(b for _, b in times) - min(a for a, _ in times)
        busy = sum(b - a for a, b in times)
        evals = [t.user_attrs.get(T.A_EVAL, 0) for t in trials if T.A_EVAL in t.user_attrs]
        lines.append(f"throughput: {len(times) / span * 3600 if span > 0 else 0:.0f} trials/hour; "
                     f"mean trial {busy / len(times):.1f} s, mean evaluation "
                     f"{(sum(evals) / len(evals)) if evals else 0:.1f} s")
    lines.append(f"{'trial':<28}{'score':>8}  " + "".join(f"{d + ' acc [95% CI]':>21}" for d in domains))
    for t in baselines(study).values():
        lines.append(_row(t, domains))
    lines.append("best:")
    best = best_trials(study, k)
    for t in best:
        lines.append(_row(t, domains))
    if best:
        lines.append(f"best {trial_label(best[0])} minus each baseline, paired on the same dev items "
                     "(accuracy difference [95% CI], McNemar exact p):")
        for label, _, cmp in E.best_vs_baselines(study, best[0]):
            lines.append(f"  vs {label[:40]}: {E.comparison_text(cmp, ascii=True)}")
        lines.append("note: " + E.selection_note(finished))
    return lines


def status_dict(study: optuna.Study) -> dict[str, Any]:
    best = best_trials(study, 1)
    out: dict[str, Any] = {
        "finished": len(T.finished_trials(study)),
        "best_trial": best[0].number if best else None,
        "best_score": scalar(best[0]) if best else None,
        "best_domains": E.domain_accuracies(best[0]) if best else None,
        "baselines": {n: scalar(t) for n, t in baselines(study).items()},
        "baseline_domains": {n: E.domain_accuracies(t) for n, t in baselines(study).items()},
    }
    if best:
        out["best_vs_baselines"] = {label: E.comparison_dict(cmp)
                                    for label, _, cmp in E.best_vs_baselines(study, best[0])}
    return out
