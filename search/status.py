"""What a campaign has done so far: best trials, baselines, progress, throughput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from search import driver as D
from search.campaign import Campaign
from search.storage import open_campaign_storage, sqlite_file  # noqa: F401 (sqlite_file: re-export)

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


def open_storage(directory: Path) -> tuple[Campaign, optuna.storages.RDBStorage, int]:
    """A campaign directory's campaign, its study storage and the study's id, checked to exist
    (see ``search.storage.open_campaign_storage``; errors show the storage URL masked)."""
    return open_campaign_storage(directory)


def load_campaign_study(directory: Path) -> tuple[Campaign, optuna.Study]:
    campaign, storage, _ = open_storage(directory)
    return campaign, optuna.load_study(study_name=campaign.name, storage=storage)


def load_study(directory: Path) -> optuna.Study:
    """The study of a campaign directory (its campaign.yaml names the storage)."""
    return load_campaign_study(directory)[1]


def trial_label(t: optuna.trial.FrozenTrial) -> str:
    base = t.user_attrs.get(D.A_BASELINE)
    if base is None:
        return f"#{t.number}"
    return f"#{t.number} {base.split('/')[-1] if base.startswith('model:') else base}"


def scalar(t: optuna.trial.FrozenTrial) -> float | None:
    if t.state != optuna.trial.TrialState.COMPLETE:
        return None
    return float(t.user_attrs.get(D.A_SCORE, t.values[0]))


def best_trials(study: optuna.Study, k: int = 5) -> list[optuna.trial.FrozenTrial]:
    done = [t for t in study.get_trials(deepcopy=False) if scalar(t) is not None]
    return sorted(done, key=lambda t: -scalar(t))[:k]


def baselines(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    out = {}
    for t in study.get_trials(deepcopy=False):
        name = t.user_attrs.get(D.A_BASELINE)
        if name and t.state == optuna.trial.TrialState.COMPLETE and name not in out:
            out[name] = t
    return out


def domain_row(t: optuna.trial.FrozenTrial, domains: list[str]) -> list[str]:
    doms = t.user_attrs.get(D.A_DOMAINS, {})
    return [f"{doms[d]['acc']:.3f}" if d in doms else "-" for d in domains]


def summary_lines(study: optuna.Study, *, k: int = 5) -> list[str]:
    trials = study.get_trials(deepcopy=False)
    interrupted = sum(bool(t.user_attrs.get(D.A_INTERRUPTED)) for t in trials)
    counts = {s: sum(t.state.name == s and not t.user_attrs.get(D.A_INTERRUPTED) for t in trials)
              for s in STATES}
    campaign = study.user_attrs.get("campaign", {})
    budget = (campaign.get("budget") or {}).get("trials", "?")
    domains = list((campaign.get("objectives") or {}).keys()) or ["legal", "health", "enem"]
    lines = [f"progress: {len(D.finished_trials(study))}/{budget} trials "
             + ", ".join(f"{s.lower()} {counts[s]}" for s in STATES if counts[s])
             + (f" (+{interrupted} interrupted, re-run)" if interrupted else "")]
    # the study's own clocks cover ask and tell too, not only the worker's part
    times = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in trials
             if t.datetime_start and t.datetime_complete and not t.user_attrs.get(D.A_INTERRUPTED)]
    if times:
        span = max(b for _, b in times) - min(a for a, _ in times)
        busy = sum(b - a for a, b in times)
        evals = [t.user_attrs.get(D.A_EVAL, 0) for t in trials if D.A_EVAL in t.user_attrs]
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
    return {"finished": len(D.finished_trials(study)),
            "best_trial": best[0].number if best else None,
            "best_score": scalar(best[0]) if best else None,
            "baselines": {n: scalar(t) for n, t in baselines(study).items()}}
