"""``brmerge report``: a campaign's figures as PNG files and one self-contained HTML page.

The page embeds its figures as data URIs, so it can be mailed or attached on its own. It shows
the optimization history, the best trial's per-layer coefficients, the Pareto front of a
multi-objective study, the best trial against the baselines per domain, a table of the top
trials and the campaign's facts. Everything is read from the study's record (``search.trials``);
nothing is evaluated again.

The figures are drawn in ``search.figures``.
"""

from __future__ import annotations

import base64
import html
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

TrialState = optuna.trial.TrialState

from search import evidence as E
from search import pruning_audit
from search.verdicts import INTERVAL_NOTE, search_counts
from search import trials as T
from search.errors import SearchError
from search.campaign import Campaign
from search.campaign_files import make_dir, replace_text
from search.figures import (Entry, completed_baselines, coefficient_grid, domain_order, domains_figure,
                            heatmap_figure, history_figure, is_multi_objective, num_layers, objective_names,
                            pareto_figure, save_png)
from search.genome import GenomeSpace
from search.storage import load_campaign_study
from search.trials import baselines, best_trials, scalar

TOP = 10               # trials in the table: enough to see how flat the top is
FIGURES = ("history.png", "heatmap.png", "pareto.png", "domains.png")


# -- what the page is made of -----------------------------------------------------------------

@dataclass
class Section:
    title: str
    image: Path | None = None      # the PNG shown in the section, if any
    note: str = ""                 # plain text shown under the title (escaped when rendered)
    html_body: str = ""            # trusted markup built by this module (tables)


@dataclass
class Report:
    html: Path
    images: list[Path] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [*self.images, self.html]


# -- tables and facts -------------------------------------------------------------------------

def _td(value: Any, *, num: bool = False) -> str:
    cls = ' class="num"' if num else ""
    return f"<td{cls}>{html.escape(str(value))}</td>"


def trial_table(study: optuna.Study, campaign: Campaign, *, top: int) -> str:
    """The top trials by score and every baseline, one row each, best first."""
    rows = {t.number: t for t in best_trials(study, top)}
    rows.update({t.number: t for t in baselines(study).values()})
    domains = domain_order(campaign, list(rows.values()))
    multi = is_multi_objective(study)
    front = {t.number for t in study.best_trials} if multi else set()
    head = ["trial", "kind", "score [95% CI]", *[f"{d} acc [95% CI]" for d in domains]]
    weights, groups = E.campaign_weights(study), T.item_groups(study)
    head += ["Pareto"] if multi else []
    head += ["eval s", "worker", "note"]
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for t in sorted(rows.values(), key=lambda t: -scalar(t)):
        v = T.view(t)
        accs = E.domain_accuracies(t)
        kind = f"baseline {v.baseline}" if v.baseline is not None else "search"
        cells = [_td(f"#{t.number}"), _td(kind), _td(E.trial_score_text(t, weights, groups), num=True)]
        cells += [_td(E.accuracy_text(accs[d]["correct"], accs[d]["n"]) if d in accs else "-", num=True)
                  for d in domains]
        cells += [_td("yes" if t.number in front else "")] if multi else []
        cells += [_td(f"{v.eval_seconds:.1f}" if v.eval_seconds is not None else "-", num=True),
                  _td("-" if v.worker is None else v.worker),
                  _td(f"same recipe as #{v.cached_from}" if v.cached_from is not None else "")]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def comparison_table(study: optuna.Study, best: optuna.trial.FrozenTrial) -> str:
    """The best trial minus each baseline on the dev items it was selected on: no verdict."""
    rows = E.dev_vs_baselines(study, best)
    if not rows:
        return ""
    out = ["<table>", "<tr><th>baseline</th><th>best minus baseline, weighted score [95% CI], sign-flip p</th>"
           "<th>items scored differently</th></tr>"]
    for label, cmp in rows.items():
        text = cmp["text"] if cmp else E.comparison_text(None)
        out.append(f"<tr>{_td(label)}{_td(text)}{_td(cmp['discordant'] if cmp else '-', num=True)}</tr>")
    out.append("</table>")
    return "\n".join(out)


def held_out_section(directory: Path) -> Section:
    """The latest export's verdicts, from the held-out test items."""
    from search.verdicts import verdict_lines

    held_out = E.latest_held_out(directory)
    title = "Verdicts on held-out test items (latest export)"
    if not held_out:
        return Section(title, note="none yet: `brmerge export` scores the chosen merge and the baselines on "
                                   "the test split; verdicts come only from those items")
    body = "<ul>" + "".join(f"<li>{html.escape(line.strip())}</li>" for line in verdict_lines(held_out)) + "</ul>"
    return Section(title, html_body=body,
                   note="weighted score, paired domain-stratified sign-flip test; per-baseline p Holm-adjusted; "
                        f"{INTERVAL_NOTE}; "
                        "\"beats all\" is an intersection-union test (each one-sided p <= alpha)")


def failures_table(study: optuna.Study, *, limit: int = 20) -> str:
    failed = T.counted(study.get_trials(deepcopy=False), TrialState.FAIL)
    if not failed:
        return ""
    rows = [f"<tr>{_td(f'#{t.number}')}{_td(T.view(t).error or 'no reason recorded')}</tr>"
            for t in failed[-limit:]]
    more = f"<p>{len(failed) - limit} earlier failures not shown.</p>" if len(failed) > limit else ""
    return more + "<table><tr><th>trial</th><th>error</th></tr>" + "".join(rows) + "</table>"


def campaign_facts(study: optuna.Study, campaign: Campaign) -> list[tuple[str, str]]:
    trials = study.get_trials(deepcopy=False)
    done = T.finished_trials(study)
    interrupted = sum(T.interrupted(t) for t in trials)
    running = sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    facts = [
        ("campaign", campaign.name),
        ("base model", campaign.base_model),
        ("models", ", ".join(campaign.models)),
        ("method", campaign.method),
        ("sampler", campaign.sampler + (f" (multi-objective: {', '.join(objective_names(study))})"
                                         if is_multi_objective(study) else "")),
        ("search space", f"granularity {campaign.granularity}; "
                         + ", ".join(f"{p} in [{lo:g}, {hi:g}]" for p, (lo, hi) in campaign.params.items())
                         + ("; attention and MLP apart" if campaign.split_attn_mlp else "")),
        ("objectives", ", ".join(f"{d} x{w:g}" for d, w in campaign.objectives.items())),
        ("evaluation", f"suite {campaign.suite}, limit {campaign.limit}, stage 1 {campaign.stage1}"),
        ("budget", f"{campaign.trials} trials"
                   + (f", timeout {campaign.timeout:g} s" if campaign.timeout else "")),
        ("trials done", f"{len(done)} of {campaign.trials}"),
        ("complete", str(len(T.counted(trials, TrialState.COMPLETE)))),
        ("pruned", str(len(T.counted(trials, TrialState.PRUNED)))),
        ("failed", str(len(T.counted(trials, TrialState.FAIL)))),
    ]
    if interrupted:
        facts.append(("interrupted", f"{interrupted} (queued again; not counted)"))
    if running:
        facts.append(("running or queued", str(running)))
    rate = T.throughput(trials)
    if rate is not None:
        facts.append(("wall time", f"{rate.span_s / 3600:.2f} h ({rate.per_hour:.0f} trials/hour)"
                      if rate.span_s > 0 else "-"))
    best = best_trials(study, 1)
    bases = baselines(study)
    if best:
        score = E.trial_score_text(best[0], E.campaign_weights(study), T.item_groups(study))
        line = f"#{best[0].number}, score {score}"
        if bases:
            name, t = max(bases.items(), key=lambda kv: scalar(kv[1]))
            line += (f" (dev margin {scalar(best[0]) - scalar(t):+.4f} over the best baseline, {name}: "
                     "selected on these items)")
        facts.append(("best trial", line))
    return facts


# -- the page ---------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0 1.4em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f3f3f3; }
img { max-width: 100%; height: auto; border: 1px solid #eee; } .note { color: #555; }
"""


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def render_html(campaign: Campaign, facts: Sequence[tuple[str, str]], sections: Sequence[Section]) -> str:
    title = f"brmerge report: {campaign.name}"
    parts = ["<!DOCTYPE html>",
             f"<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class=\"sub\">generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
             "<h2>Campaign</h2><table>"
             + "".join(f"<tr><th>{html.escape(k)}</th>{_td(v)}</tr>" for k, v in facts) + "</table>"]
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.note:
            parts.append(f"<p class=\"note\">{html.escape(s.note)}</p>")
        if s.image is not None:
            parts.append(f"<img alt=\"{html.escape(s.title)}\" src=\"{data_uri(s.image)}\">")
        parts.append(s.html_body)
    parts.append("</body></html>\n")
    return "\n".join(parts)


# -- putting it together ----------------------------------------------------------------------

def _heatmap_section(study: optuna.Study, campaign: Campaign, best: optuna.trial.FrozenTrial,
                     out: Path) -> Section:
    title = "Per-layer coefficients of the best trial"
    layers = num_layers(study, campaign, best.params)
    space = GenomeSpace(campaign, layers or 0)
    missing = [n for n in space.param_names() if n not in best.params]
    if not layers or missing:
        return Section(title, note=f"not drawn: trial #{best.number}'s parameters do not match the search "
                                   "space of campaign.yaml (was it edited after the search?)")
    grid = coefficient_grid(space, best.params)
    fig = heatmap_figure(grid, ranges=campaign.params, parts=len(space.parts),
                         title=f"Best trial #{best.number} (score {scalar(best):.4f}): "
                               f"{campaign.method} coefficients per layer")
    return Section(title, image=save_png(fig, out / "heatmap.png"),
                   note=f"granularity {campaign.granularity}; each colour scale spans the parameter's "
                        "search range")


def _domains_section(study: optuna.Study, campaign: Campaign, best: optuna.trial.FrozenTrial,
                     out: Path) -> Section:
    title = "Best versus baselines per domain"
    bases = completed_baselines(study)
    also = [b.title for b in bases if b.trial.number == best.number]  # a baseline may be the best
    entries: list[Entry] = [
        (f"best #{best.number}" + (f" ({also[0]})" if also else ""), best, "tab:orange")]
    entries += [(b.title, b.trial, b.colour) for b in bases if b.trial.number != best.number]
    domains = domain_order(campaign, [t for _, t, _ in entries])
    if not domains:
        return Section(title, note="not drawn: no trial recorded per-domain scores")
    note = "" if len(entries) > 1 else "no baseline has completed yet"
    return Section(title, image=save_png(domains_figure(entries, domains), out / "domains.png"), note=note)


def _pareto_section(study: optuna.Study, out: Path) -> Section:
    title = "Pareto front"
    if not is_multi_objective(study):
        return Section(title, note="single-objective study (one weighted score): no Pareto front; "
                                   "use sampler nsga2 for one objective per domain")
    return Section(title, image=save_png(pareto_figure(study), out / "pareto.png"),
                   note="trials on the front are not beaten on every objective by any other trial")


def write_report(directory: Path, *, out: Path | None = None, top: int = TOP) -> Report:
    """Write the figures and ``report.html`` for the campaign in ``directory``."""
    if top < 1:
        raise SearchError(f"--top {top}: the table needs at least one trial; give a positive number")
    campaign, study = load_campaign_study(Path(directory))
    out = Path(out) if out is not None else Path(directory) / "report"
    make_dir(out, root=Path(directory))   # never into a folder link planted in the campaign directory
    sections: list[Section] = []
    best = best_trials(study, 1)
    if not best:
        sections.append(Section("No completed trial yet",
                                note="nothing to plot: no trial of this campaign has completed; run or "
                                     "resume `brmerge search` and report again"))
    else:
        history = save_png(history_figure(study), out / "history.png")
        sections.append(Section("Optimization history", image=history,
                                note="baselines are dashed lines; pruned trials show their stage-1 score; "
                                     "failed trials are marked along the bottom"))
        sections.append(_heatmap_section(study, campaign, best[0], out))
        sections.append(_pareto_section(study, out))
        sections.append(_domains_section(study, campaign, best[0], out))
        sections.append(Section(f"Top {top} trials and baselines",
                                html_body=trial_table(study, campaign, top=top),
                                note="accuracies with 95% Wilson intervals"))
        counts = search_counts(study, Path(directory))
        sections.append(Section("The best trial against the baselines on the dev items it was selected on",
                                html_body=comparison_table(study, best[0]),
                                note="weighted score difference with its stratified bootstrap 95% interval and "
                                     "the paired sign-flip p; selected on these items, so no verdict. Note: "
                                     + E.selection_note(counts["trials_searched"], counts)))
        sections.append(held_out_section(Path(directory)))
        sections.append(Section("Stage-1 pruning", html_body="<ul>" + "".join(
            f"<li>{html.escape(line)}</li>" for line in pruning_audit.lines(pruning_audit.summary(study))) + "</ul>"))
    failures = failures_table(study)
    if failures:
        sections.append(Section("Failed trials", html_body=failures))
    page = out / "report.html"
    replace_text(page, render_html(campaign, campaign_facts(study, campaign), sections), root=Path(directory))
    images = [s.image for s in sections if s.image is not None]
    for name in set(FIGURES) - {p.name for p in images}:  # a figure of an earlier report, now stale
        (out / name).unlink(missing_ok=True)
    return Report(html=page, images=images)
