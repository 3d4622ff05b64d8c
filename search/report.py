"""``brmerge report``: a campaign's figures as PNG files and one self-contained HTML page.

The page embeds its figures as data URIs, so it can be mailed or attached on its own. It shows
the optimization history, the best trial's per-layer coefficients, the Pareto front of a
multi-objective study, the best trial against the baselines per domain, a table of the top
trials and the campaign's facts. Everything is read from the study the driver wrote (the
``A_*`` trial attributes of ``search.driver``); nothing is evaluated again.

Figures are drawn on ``matplotlib.figure.Figure`` objects, never through pyplot: no backend is
switched and no global figure registry is touched, so a notebook or a server that imports this
module keeps its own matplotlib set-up, and nothing needs a display.
"""

from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from search import trials as T
from search.errors import SearchError
from search.campaign import Campaign
from search.genome import GenomeSpace
from search.storage import load_campaign_study
from search.trials import baselines, best_trials, scalar

TrialState = optuna.trial.TrialState
Grid = dict[str, list[tuple[str, list[float]]]]     # {param: [(row label, one value per layer)]}
Entry = tuple[str, optuna.trial.FrozenTrial, Any]   # a bar of the domain figure: (label, trial, colour)

DPI = 110              # crisp on a laptop screen; a few tens of KB per figure
TOP = 10               # trials in the table: enough to see how flat the top is
ANNOTATE_LAYERS = 24   # heatmap cells carry their value up to this many layers; beyond, unreadable
SCORE_LABEL = "dev score (weighted over domains)"
FIGURES = ("history.png", "heatmap.png", "pareto.png", "domains.png")


# -- loading ----------------------------------------------------------------------------------



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


def short_names(refs: Sequence[str]) -> dict[str, str]:
    """Model refs by their last path component, unless two would read the same."""
    tails = [r.rstrip("/").split("/")[-1] or r for r in refs]
    return {r: (t if tails.count(t) == 1 else r) for r, t in zip(refs, tails)}


@dataclass(frozen=True)
class Baseline:
    name: str                      # as recorded: "uniform" or "model:<ref>"
    title: str                     # as shown: "uniform merge", "<model> alone"
    trial: optuna.trial.FrozenTrial
    colour: tuple[float, ...]      # the same in every figure


def _colour(i: int) -> tuple[float, ...]:
    # tab10 from its third colour: blue and orange are the trials and the best trial
    return colormaps["tab10"]((i + 2) % 10)


def completed_baselines(study: optuna.Study) -> list[Baseline]:
    found = baselines(study)
    refs = [n[len("model:"):] for n in found if n.startswith("model:")]
    short = short_names(refs)
    out = []
    for i, (name, t) in enumerate(found.items()):
        if name.startswith("model:"):
            title = f"{short[name[len('model:'):]]} alone"
        else:
            title = "uniform merge" if name == "uniform" else name
        out.append(Baseline(name, title, t, _colour(i)))
    return out


def counted(trials: Sequence[optuna.trial.FrozenTrial], state: TrialState) -> list[optuna.trial.FrozenTrial]:
    """Trials in ``state`` that count toward the budget (interrupted ones were re-run)."""
    return [t for t in trials if t.state == state and not t.user_attrs.get(T.A_INTERRUPTED)]


def is_multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def objective_names(study: optuna.Study) -> list[str]:
    names = study.user_attrs.get("objective_names") or []
    n = len(study.directions)
    return list(names) if len(names) == n else [f"objective {i}" for i in range(n)]


def domain_order(campaign: Campaign, trials: Sequence[optuna.trial.FrozenTrial]) -> list[str]:
    """The campaign's objectives first, in its order, then any other domain a trial scored."""
    seen = {d for t in trials for d in (t.user_attrs.get(T.A_DOMAINS) or {})}
    first = [d for d in campaign.objectives if d in seen]
    return first + sorted(seen - set(first))


def stage1_value(t: optuna.trial.FrozenTrial) -> float | None:
    value = t.user_attrs.get(T.A_STAGE1)
    if value is None and t.intermediate_values:
        value = t.intermediate_values[max(t.intermediate_values)]
    return None if value is None else float(value)


# -- figures ----------------------------------------------------------------------------------

def history_figure(study: optuna.Study) -> Figure:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if scalar(t) is not None]
    fig = Figure(figsize=(10, 5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    searched = [t for t in complete if T.A_BASELINE not in t.user_attrs]
    ax.scatter([t.number for t in searched], [scalar(t) for t in searched], s=20, color="tab:blue",
               zorder=3, label="complete trial")
    best, running = [], -math.inf
    for t in complete:
        running = max(running, scalar(t))
        best.append(running)
    ax.step([t.number for t in complete], best, where="post", color="tab:orange", lw=2,
            label="best so far", zorder=2)
    pruned = [(t.number, stage1_value(t)) for t in counted(trials, TrialState.PRUNED)]
    pruned = [(n, v) for n, v in pruned if v is not None]
    if pruned:
        ax.scatter(*zip(*pruned), marker="x", s=24, color="0.55", zorder=3, label="pruned (stage-1 score)")
    for b in completed_baselines(study):
        score = scalar(b.trial)
        ax.axhline(score, color=b.colour, ls="--", lw=1.3, label=f"baseline: {b.title} ({score:.3f})")
        ax.scatter([b.trial.number], [score], marker="D", s=30, color=b.colour, zorder=4)
    failed = [t.number for t in counted(trials, TrialState.FAIL)]
    if failed:
        # failures have no score: a rug along the bottom edge shows when they happened
        ax.scatter(failed, [0.02] * len(failed), marker="v", s=30, color="black",
                   transform=ax.get_xaxis_transform(), zorder=4, label=f"failed ({len(failed)})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial number")
    ax.set_ylabel(SCORE_LABEL)
    ax.set_title("Optimization history")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return fig


def num_layers(study: optuna.Study, campaign: Campaign, params: Mapping[str, float]) -> int | None:
    """Layers of the base model: recorded by the driver; inferred from names for older studies."""
    if isinstance(study.user_attrs.get("num_layers"), int):
        return study.user_attrs["num_layers"]
    if campaign.granularity == "layer":
        layers = {n.rsplit(".", 1)[1] for n in params if n.rsplit(".", 1)[1].startswith("L")}
        return len(layers) or None
    return None


def coefficient_grid(space: GenomeSpace, params: Mapping[str, float]) -> Grid:
    """``{param: [(row label, per-layer values)]}``, one row per model (× attn/mlp)."""
    names = short_names(space.campaign.models)
    grid: Grid = {}
    for p in space.campaign.params:
        rows = []
        for m, ref in enumerate(space.campaign.models):
            for part in space.parts:
                label = names[ref] + (f" · {part}" if part else "")
                # the genome's own expansion, so the heatmap shows exactly what the recipe got
                rows.append((label, space.per_layer(params, m, p, part)))
        grid[p] = rows
    return grid


def heatmap_figure(grid: Grid, *,
                   ranges: Mapping[str, tuple[float, float]], title: str, parts: int) -> Figure:
    layers = len(next(iter(grid.values()))[0][1])
    heights = [len(rows) for rows in grid.values()]
    fig = Figure(figsize=(max(7.0, 2.5 + 0.38 * layers), 1.4 + sum(0.45 * h + 0.7 for h in heights)),
                 dpi=DPI, layout="constrained")
    axes = fig.subplots(len(grid), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (param, rows) in zip(axes, grid.items()):
        lo, hi = ranges[param]
        data = np.array([values for _, values in rows])  # (rows, layers)
        # the colour scale is the search range, so a colour reads as a position in that range
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_yticks(range(len(rows)), [label for label, _ in rows])
        step = 1 if layers <= 32 else math.ceil(layers / 32)
        ax.set_xticks(range(0, layers, step))
        ax.set_title(f"{param}  (search range {lo:g} to {hi:g})", fontsize="medium", loc="left")
        for boundary in range(parts, len(rows), parts):  # separate models when attn/mlp split
            ax.axhline(boundary - 0.5, color="white", lw=2)
        if layers <= ANNOTATE_LAYERS:
            for (r, c), v in np.ndenumerate(data):
                dark = (v - lo) / (hi - lo or 1) < 0.6
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
        fig.colorbar(im, ax=ax, pad=0.01, fraction=0.04)
    axes[-1].set_xlabel("layer")
    fig.suptitle(title)
    return fig


def pareto_figure(study: optuna.Study) -> Figure:
    names = objective_names(study)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.values]
    front = {t.number for t in study.best_trials}
    fig = Figure(figsize=(8, 6), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    rest = [t for t in complete if t.number not in front]
    on = sorted((t for t in complete if t.number in front), key=lambda t: t.values[0])
    ax.scatter([t.values[0] for t in rest], [t.values[1] for t in rest], s=20, color="tab:blue",
               alpha=0.6, label="trial")
    # orange, as the best trial elsewhere; baselines take tab10 from its third colour
    ax.scatter([t.values[0] for t in on], [t.values[1] for t in on], s=46, color="tab:orange",
               edgecolor="black", zorder=3, label=f"Pareto front ({len(on)})")
    if len(names) == 2 and len(on) > 1:  # with more objectives the projected front is no line
        ax.step([t.values[0] for t in on], [t.values[1] for t in on], where="pre", color="tab:orange",
                lw=1, alpha=0.7)
    for b in completed_baselines(study):
        ax.scatter([b.trial.values[0]], [b.trial.values[1]], marker="D", s=44, color=b.colour,
                   edgecolor="black", zorder=4, label=f"baseline: {b.title}")
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    shown = f" (first 2 of {len(names)} objectives; front over all)" if len(names) > 2 else ""
    ax.set_title(f"Pareto front{shown}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return fig


def domains_figure(entries: Sequence[Entry], domains: Sequence[str]) -> Figure:
    """Grouped bars: one group per domain, one bar per (label, trial, colour) entry; the first is the best."""
    fig = Figure(figsize=(max(7.0, 1.6 * len(domains) + 4), 4.8), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(domains))
    width = 0.8 / len(entries)
    top = 0.0
    for i, (label, t, colour) in enumerate(entries):
        doms = t.user_attrs.get(T.A_DOMAINS) or {}
        accs = [float(doms[d]["acc"]) if d in doms else math.nan for d in domains]
        bars = ax.bar(x + (i - (len(entries) - 1) / 2) * width, accs, width, label=label, color=colour,
                      edgecolor="black" if i == 0 else None)
        if len(entries) * len(domains) <= 24:  # beyond, the numbers overlap; the table has them
            ax.bar_label(bars, labels=["" if math.isnan(a) else f"{a:.3f}" for a in accs], fontsize=7,
                         padding=1)
        top = max([top, *[a for a in accs if not math.isnan(a)]])
    n_items = {}
    for _, t, _ in entries:
        for d, v in (t.user_attrs.get(T.A_DOMAINS) or {}).items():
            n_items.setdefault(d, v.get("n"))
    ax.set_xticks(x, [f"{d}\n(n={n_items[d]})" if n_items.get(d) else d for d in domains])
    ax.set_ylabel("dev accuracy")
    ax.set_ylim(0, min(1.0, top * 1.15) if top > 0 else 1.0)
    ax.set_title("Best trial versus baselines, per domain")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", dpi=DPI)
    return path


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
    head = ["trial", "kind", "score", *[f"{d} acc" for d in domains]]
    head += ["Pareto"] if multi else []
    head += ["eval s", "worker", "note"]
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for t in sorted(rows.values(), key=lambda t: -scalar(t)):
        attrs = t.user_attrs
        doms = attrs.get(T.A_DOMAINS) or {}
        kind = f"baseline {attrs[T.A_BASELINE]}" if T.A_BASELINE in attrs else "search"
        cells = [_td(f"#{t.number}"), _td(kind), _td(f"{scalar(t):.4f}", num=True)]
        cells += [_td(f"{doms[d]['acc']:.3f}" if d in doms else "-", num=True) for d in domains]
        cells += [_td("yes" if t.number in front else "")] if multi else []
        seconds = attrs.get(T.A_EVAL)
        cells += [_td(f"{seconds:.1f}" if isinstance(seconds, (int, float)) else "-", num=True),
                  _td(attrs.get(T.A_WORKER, "-")),
                  _td(f"same recipe as #{attrs[T.A_CACHED]}" if attrs.get(T.A_CACHED) is not None else "")]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def failures_table(study: optuna.Study, *, limit: int = 20) -> str:
    failed = counted(study.get_trials(deepcopy=False), TrialState.FAIL)
    if not failed:
        return ""
    rows = [f"<tr>{_td(f'#{t.number}')}{_td(t.user_attrs.get(T.A_ERROR, 'no reason recorded'))}</tr>"
            for t in failed[-limit:]]
    more = f"<p>{len(failed) - limit} earlier failures not shown.</p>" if len(failed) > limit else ""
    return more + "<table><tr><th>trial</th><th>error</th></tr>" + "".join(rows) + "</table>"


def campaign_facts(study: optuna.Study, campaign: Campaign) -> list[tuple[str, str]]:
    trials = study.get_trials(deepcopy=False)
    done = T.finished_trials(study)
    interrupted = sum(bool(t.user_attrs.get(T.A_INTERRUPTED)) for t in trials)
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
        ("complete", str(len(counted(trials, TrialState.COMPLETE)))),
        ("pruned", str(len(counted(trials, TrialState.PRUNED)))),
        ("failed", str(len(counted(trials, TrialState.FAIL)))),
    ]
    if interrupted:
        facts.append(("interrupted", f"{interrupted} (queued again; not counted)"))
    if running:
        facts.append(("running or queued", str(running)))
    times = [(t.user_attrs.get(T.A_START), t.user_attrs.get(T.A_END)) for t in trials]
    times = [(a, b) for a, b in times if isinstance(a, (int, float)) and isinstance(b, (int, float))]
    if times:
        span = max(b for _, b in times) - min(a for a, _ in times)
        facts.append(("wall time", f"{span / 3600:.2f} h ({len(times) / span * 3600:.0f} trials/hour)"
                      if span > 0 else "-"))
    best = best_trials(study, 1)
    bases = baselines(study)
    if best:
        line = f"#{best[0].number}, score {scalar(best[0]):.4f}"
        if bases:
            name, t = max(bases.items(), key=lambda kv: scalar(kv[1]))
            line += f" ({scalar(best[0]) - scalar(t):+.4f} over the best baseline, {name})"
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
    out.mkdir(parents=True, exist_ok=True)
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
                                html_body=trial_table(study, campaign, top=top)))
    failures = failures_table(study)
    if failures:
        sections.append(Section("Failed trials", html_body=failures))
    page = out / "report.html"
    page.write_text(render_html(campaign, campaign_facts(study, campaign), sections), encoding="utf-8")
    images = [s.image for s in sections if s.image is not None]
    for name in set(FIGURES) - {p.name for p in images}:  # a figure of an earlier report, now stale
        (out / name).unlink(missing_ok=True)
    return Report(html=page, images=images)
