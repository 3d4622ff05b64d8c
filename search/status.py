"""What a campaign has done so far: best trials, baselines, progress, throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from benchmarks_ptbr.sources import SAMPLE_DOMAINS
from search import evidence as E
from search import pruning_audit
from search import verdicts as V
from search import trials as T
from search.trials import baselines, best_trials, scalar, trial_label

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def domain_row(t: optuna.trial.FrozenTrial, domains: list[str]) -> list[str]:
    """Each domain's accuracy with its 95% Wilson interval, e.g. ``0.611 [0.39, 0.80]``."""
    accs = E.domain_accuracies(t)
    return [E.accuracy_text(accs[d]["correct"], accs[d]["n"]) if d in accs else "-" for d in domains]


def _row(t: optuna.trial.FrozenTrial, domains: list[str], weights, groups) -> str:
    return (f"{trial_label(t)[:27]:<28}{E.trial_score_text(t, weights, groups):>26}  "
            + "".join(f"{v:>21}" for v in domain_row(t, domains)))


def summary_lines(study: optuna.Study, *, k: int = 5, directory: Path | None = None) -> list[str]:
    """The status as text; ``directory`` (the campaign's) adds its exports' held-out verdicts."""
    trials = study.get_trials(deepcopy=False)
    interrupted = sum(T.interrupted(t) for t in trials)
    counts = {s: sum(t.state.name == s and not T.interrupted(t) for t in trials) for s in STATES}
    campaign = T.campaign_attr(study)
    budget = (campaign.get("budget") or {}).get("trials", "?")
    # a study recorded without its campaign: the domains the sample suite scores by default
    domains = list((campaign.get("objectives") or {}).keys()) or list(SAMPLE_DOMAINS)
    finished = len(T.finished_trials(study))
    lines = [f"progress: {finished}/{budget} trials "
             + ", ".join(f"{s.lower()} {counts[s]}" for s in STATES if counts[s])
             + (f" (+{interrupted} interrupted, re-run)" if interrupted else "")]
    rate = T.throughput(trials)
    if rate is not None:
        lines.append(f"throughput: {rate.per_hour:.0f} trials/hour; mean trial {rate.mean_trial_s:.1f} s, "
                     f"mean evaluation {rate.mean_eval_s:.1f} s")
    weights, groups = E.campaign_weights(study), T.item_groups(study)
    lines.append(f"{'trial':<28}{'score [95% CI]':>26}  " + "".join(f"{d + ' acc [95% CI]':>21}" for d in domains))
    for t in baselines(study).values():
        lines.append(_row(t, domains, weights, groups))
    lines.append("best:")
    best = best_trials(study, k)
    for t in best:
        lines.append(_row(t, domains, weights, groups))
    if best:
        lines.append(f"best {trial_label(best[0])} minus each baseline on the dev items it was selected on "
                     "(weighted score difference [95% CI], paired sign-flip p):")
        for label, cmp in E.dev_vs_baselines(study, best[0]).items():
            lines.append(f"  vs {label[:40]}: {cmp['text'] if cmp else E.comparison_text(None)}")
        held_out = E.latest_held_out(directory)
        if held_out:
            lines.append("latest export, " + V.verdict_lines(held_out)[0])
            lines.extend(V.verdict_lines(held_out)[1:])
        else:
            lines.append("verdicts: none yet; `brmerge export` tests the chosen merge on the held-out test split")
        counts = V.search_counts(study, directory)
        lines.append("note: " + E.selection_note(finished, counts))
    lines.extend(pruning_audit.lines(pruning_audit.summary(study)))
    return lines


def status_dict(study: optuna.Study, directory: Path | None = None) -> dict[str, Any]:
    best = best_trials(study, 1)
    weights, groups = E.campaign_weights(study), T.item_groups(study)
    counts = V.search_counts(study, directory)
    out: dict[str, Any] = {
        "finished": len(T.finished_trials(study)),
        "counts": counts,
        "selection_note": E.selection_note(counts["trials_searched"], counts),
        "best_trial": best[0].number if best else None,
        "best_score": scalar(best[0]) if best else None,
        "best_score_ci95": E.trial_score(best[0], weights, groups)["ci95"] if best else None,
        "baseline_scores": {n: E.trial_score(t, weights, groups) for n, t in baselines(study).items()},
        "pruning": pruning_audit.summary(study),
        "held_out": E.latest_held_out(directory),
        "best_domains": E.domain_accuracies(best[0]) if best else None,
        "baselines": {n: scalar(t) for n, t in baselines(study).items()},
        "baseline_domains": {n: E.domain_accuracies(t) for n, t in baselines(study).items()},
    }
    if best:
        out["best_vs_baselines"] = E.dev_vs_baselines(study, best[0])   # dev: selected on these items, no verdict
    return out
