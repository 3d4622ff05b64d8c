"""The report's figures, drawn on ``matplotlib.figure.Figure`` objects, never through pyplot:
no backend is switched and no global figure registry is touched, so a notebook or a server
that imports this module keeps its own matplotlib set-up, and nothing needs a display.

Everything is read from the study's record (``search.trials``); nothing is evaluated again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from search import trials as T
from search.campaign import Campaign
from search.genome import GenomeSpace
from search import evidence as E
from search.evidence import domain_accuracies as accuracies
from search.trials import baselines, scalar

TrialState = optuna.trial.TrialState
Grid = dict[str, list[tuple[str, list[float]]]]     # {param: [(row label, one value per layer)]}
Entry = tuple[str, optuna.trial.FrozenTrial, Any]   # a bar of the domain figure: (label, trial, colour)

DPI = 110              # crisp on a laptop screen; a few tens of KB per figure
ANNOTATE_LAYERS = 24   # heatmap cells carry their value up to this many layers; beyond, unreadable
SCORE_LABEL = "dev score (weighted over domains)"


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


def is_multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def objective_names(study: optuna.Study) -> list[str]:
    names = T.recorded_objectives(study)
    n = len(study.directions)
    return list(names) if len(names) == n else [f"objective {i}" for i in range(n)]


def domain_order(campaign: Campaign, trials: Sequence[optuna.trial.FrozenTrial]) -> list[str]:
    """The campaign's objectives first, in its order, then any other domain a trial scored."""
    seen = {d for t in trials for d in T.domains_of(t)}
    first = [d for d in campaign.objectives if d in seen]
    return first + sorted(seen - set(first))


# -- figures ----------------------------------------------------------------------------------

def history_figure(study: optuna.Study) -> Figure:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if scalar(t) is not None]
    fig = Figure(figsize=(10, 5), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    searched = [t for t in complete if T.baseline_name(t) is None]
    ax.scatter([t.number for t in searched], [scalar(t) for t in searched], s=20, color="tab:blue",
               zorder=3, label="complete trial")
    best, running = [], -math.inf
    for t in complete:
        running = max(running, scalar(t))
        best.append(running)
    ax.step([t.number for t in complete], best, where="post", color="tab:orange", lw=2,
            label="best so far", zorder=2)
    pruned = [(t.number, T.stage1_value(t)) for t in T.counted(trials, TrialState.PRUNED)]
    pruned = [(n, v) for n, v in pruned if v is not None]
    if pruned:
        ax.scatter(*zip(*pruned), marker="x", s=24, color="0.55", zorder=3, label="pruned (stage-1 score)")
    weights, groups = E.campaign_weights(study), T.item_groups(study)
    for b in completed_baselines(study):
        score = scalar(b.trial)
        ax.axhline(score, color=b.colour, ls="--", lw=1.3,
                   label=f"baseline: {b.title} ({E.trial_score_text(b.trial, weights, groups)})")
        ax.scatter([b.trial.number], [score], marker="D", s=30, color=b.colour, zorder=4)
    failed = [t.number for t in T.counted(trials, TrialState.FAIL)]
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
    recorded = T.recorded_num_layers(study)
    if recorded is not None:
        return recorded
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
        owners = [(None, "whole merge")] if p in space.campaign.shared_params else \
            [(m, names[ref]) for m, ref in enumerate(space.campaign.models)]
        for m, title in owners:
            for part in space.parts:
                label = title + (f" · {part}" if part else "")
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
        found = accuracies(t)
        accs = [found[d]["acc"] if d in found else math.nan for d in domains]
        # 95% Wilson intervals as error bars: a bar's height alone hides how few items it rests on
        lows = [a - found[d]["ci95"][0] if d in found else 0.0 for a, d in zip(accs, domains)]
        highs = [found[d]["ci95"][1] - a if d in found else 0.0 for a, d in zip(accs, domains)]
        bars = ax.bar(x + (i - (len(entries) - 1) / 2) * width, accs, width, label=label, color=colour,
                      edgecolor="black" if i == 0 else None, yerr=[lows, highs], capsize=2,
                      error_kw={"elinewidth": 0.8, "alpha": 0.7})
        if len(entries) * len(domains) <= 24:  # beyond, the numbers overlap; the table has them
            ax.bar_label(bars, labels=["" if math.isnan(a) else f"{a:.3f}" for a in accs], fontsize=7,
                         padding=1)
        top = max([top, *[found[d]["ci95"][1] for d in domains if d in found]])
    n_items = {}
    for _, t, _ in entries:
        for d, v in T.domains_of(t).items():
            n_items.setdefault(d, v.get("n"))
    ax.set_xticks(x, [f"{d}\n(n={n_items[d]})" if n_items.get(d) else d for d in domains])
    ax.set_ylabel("dev accuracy (bars: 95% Wilson interval)")
    ax.set_ylim(0, min(1.1, top * 1.15) if top > 0 else 1.0)   # room for the labels above 1.0
    ax.set_title("Best trial versus baselines, per domain")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """``fig`` as a PNG at ``path``, replaced by rename (never written through a link there)."""
    import io

    from search.campaign_files import replace_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return replace_bytes(path, buf.getvalue())
