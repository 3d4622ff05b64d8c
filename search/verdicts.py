"""Claims about a searched merge, decided on held-out items only.

- A **verdict** ("better" / "worse") comes only from items not used to select the merge: the
  test split at export (:func:`held_out_verdicts`). Each baseline gets the paired, domain-
  stratified sign-flip test of the weighted score (``evals.weighted_stats``), two-sided, with
  **Holm's** adjustment over the baselines of that split; the adjusted p is shown and decides
  the word, which also needs the bootstrap interval on the same side of 0. The interval is
  the comparison's own 95%, not adjusted for the other baselines (``INTERVAL_NOTE``): with
  several baselines it can clear 0 while the adjusted p, and so the verdict, does not.
- "**Beats all baselines**" is an intersection-union claim: it holds when *every* one-sided
  p ("the merge is better than this baseline") is <= alpha; its p is the largest of them.
- A comparison on the dev items the merge was selected on (:func:`dev_comparisons`) shows the
  difference and its interval with "selected on these items: no verdict".
- Items of one twin group (the data's ``pair_id``: two wordings of one question, a true/false
  pair) are one unit of evidence: the test flips their signs together and the interval
  resamples whole groups (``clusters``; ``units`` says how many units the test had).
- Every weighted score is shown with an interval (:func:`score_dict`): a stratified bootstrap
  over the items' correctness. Per-item gold probabilities are not recorded, so the tie-break
  part of the score is held fixed: the interval is the weighted accuracy's, moved to the score.
- :func:`search_counts`: trials searched, distinct candidates, exports and test looks.
- :func:`generalization_gap`: the exported merge's dev -> test change minus the baselines' mean
  change, with a paired bootstrap interval (dev and test items resampled, each within domain).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evals import weighted_stats as W
from evals.stats import DEFAULT_ALPHA, DEFAULT_LEVEL, holm_adjust, intersection_union
from search.errors import SearchError

Bits = Mapping[str, Sequence[bool]]
# where a held-out interval and its verdict can differ: said wherever both are shown
INTERVAL_NOTE = ("each interval is that comparison's own 95%, not adjusted for the others: a verdict also "
                 "needs the Holm-adjusted p <= alpha, so an interval clear of 0 can still read "
                 "\"not distinguishable\"")


def weights_for(bits: Bits, weights: Mapping[str, float] | None) -> dict[str, float]:
    """The campaign's positive weights of the domains in ``bits`` (equal weights when unknown)."""
    if not weights:
        return {d: 1.0 for d in bits}
    return {d: float(weights[d]) for d in bits if float(weights.get(d, 0.0)) > 0}


def score_dict(score: float | None, bits: Bits, weights: Mapping[str, float] | None, *,
               level: float = DEFAULT_LEVEL, clusters: W.Clusters | None = None) -> dict[str, Any]:
    """``{score, ci95, n}``: the weighted score with its stratified bootstrap interval."""
    if score is None or not bits:
        return {"score": score, "ci95": None, "n": 0}
    w = weights_for(bits, weights)
    low, high = W.score_interval(bits, w, level=level, clusters=_usable(clusters, bits))
    shift = float(score) - W.weighted_score(bits, w)    # the tie-break part, held fixed
    return {"score": float(score), "ci95": [low + shift, high + shift], "n": sum(len(v) for v in bits.values())}


def score_text(score: float | None, bits: Bits, weights: Mapping[str, float] | None, *,
               clusters: W.Clusters | None = None) -> str:
    d = score_dict(score, bits, weights, clusters=clusters)
    if d["score"] is None:
        return "-"
    if d["ci95"] is None:
        return f"{d['score']:.4f}"
    return f"{d['score']:.4f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"


def _comparison(cmp: W.WeightedComparison) -> dict[str, Any]:
    return {"diff": cmp.diff, "ci95": [cmp.low, cmp.high], "p_value": cmp.p_value,
            "p_greater": cmp.p_greater, "n": cmp.n, "units": cmp.units, "discordant": cmp.discordant}


def _usable(clusters: W.Clusters | None, bits: Bits) -> W.Clusters | None:
    """``clusters`` when they label exactly ``bits``' items, else None (item-level)."""
    return clusters if W.labels_every_item(clusters, bits) else None


def _paired(a: Bits, b: Bits) -> bool:
    return bool(a) and bool(b) and sorted(a) == sorted(b) and all(len(a[d]) == len(b[d]) for d in a)


def dev_comparisons(best: Bits, baselines: Mapping[str, Bits], weights: Mapping[str, float] | None, *,
                    clusters: W.Clusters | None = None) -> dict[str, dict[str, Any] | None]:
    """The selected trial minus each baseline on the dev items it was selected on: numbers and
    ``"...: selected on these items: no verdict"``; None where the items do not pair.
    ``clusters``: the dev items' twin groups (see the module)."""
    out: dict[str, dict[str, Any] | None] = {}
    clusters = _usable(clusters, best)
    for label, b in baselines.items():
        if not _paired(best, b):
            out[label] = None
            continue
        cmp = W.weighted_comparison(best, b, weights_for(best, weights), clusters=clusters)
        out[label] = {**_comparison(cmp), "verdict": None,
                      "text": f"{W.format_weighted(cmp, verdict_text=False, ascii=True)}: selected on these items, "
                              "no verdict"}
    return out


def held_out_verdicts(candidate: Bits, baselines: Mapping[str, Bits], weights: Mapping[str, float] | None, *,
                      split: str = "test", alpha: float = DEFAULT_ALPHA,
                      candidate_score: float | None = None, clusters: W.Clusters | None = None) -> dict[str, Any]:
    """Verdicts of ``candidate`` against each baseline on held-out items (``split``), paired.

    Returns ``{split, alpha, n_items, n_units, score, baselines: {label: {diff, ci95, p_value,
    p_holm, p_greater, verdict, text}}, beats_all: {holds, p_value, n, text}, text}``. Baselines
    whose items do not pair with the candidate's are left out (listed in ``unpaired``).
    ``clusters``: each item's twin group, per domain in the bits' order (see the module)."""
    w = weights_for(candidate, weights)
    clusters = _usable(clusters, candidate)
    paired = {label: b for label, b in baselines.items() if _paired(candidate, b)}
    cmps = {label: W.weighted_comparison(candidate, b, w, clusters=clusters) for label, b in paired.items()}
    adjusted = dict(zip(cmps, holm_adjust([c.p_value for c in cmps.values()])))
    rows = {}
    for label, cmp in cmps.items():
        rows[label] = {**_comparison(cmp), "p_holm": adjusted[label],
                       "verdict": W.weighted_verdict(cmp, alpha=alpha, p_value=adjusted[label]),
                       "text": W.format_weighted(cmp, alpha=alpha, p_value=adjusted[label], ascii=True)
                               + f" (Holm-adjusted over {len(cmps)})"}
    iu = intersection_union([c.p_greater for c in cmps.values()], alpha=alpha)
    n = sum(len(v) for v in candidate.values())
    units = W.units(candidate, w, clusters)
    score = W.weighted_score(candidate, w) if candidate_score is None else candidate_score
    out = {"split": split, "alpha": alpha, "n_items": n, "n_units": units,
           "score": score_dict(score, candidate, weights, clusters=clusters),
           "baselines": rows, "unpaired": sorted(set(baselines) - set(paired)),
           "beats_all": {"holds": iu.holds, "p_value": iu.p_value, "n": iu.n, "text": iu.text(),
                         "test": "intersection-union of one-sided paired sign-flip tests of the weighted score"}}
    out["text"] = verdict_sentence(out)
    return out


def verdict_sentence(v: Mapping[str, Any]) -> str:
    """One sentence from :func:`held_out_verdicts`' result."""
    per = "; ".join(f"{label}: {r['text']}" for label, r in v["baselines"].items()) or "no baseline to compare"
    return (f"On {items_text(v)}, the merge {v['beats_all']['text']}. "
            f"Weighted score minus each baseline [95% CI], two-sided p Holm-adjusted ({INTERVAL_NOTE}): {per}.")


def items_text(v: Mapping[str, Any]) -> str:
    """"240 held-out test items" or, with twin groups, "240 held-out test items (120 independent
    units: items of one twin group count once)"."""
    text = f"{v['n_items']} held-out {v['split']} items"
    units = v.get("n_units", v["n_items"])
    if units != v["n_items"]:
        text += f" ({units} independent units: items of one twin group count once)"
    return text


def verdict_lines(v: Mapping[str, Any]) -> list[str]:
    head = f"on {items_text(v)}: the merge {v['beats_all']['text']}"
    return [head] + [f"  vs {label}: {r['text']}" for label, r in v["baselines"].items()]


def generalization_gap(candidate: tuple[Bits, Bits], baselines: Mapping[str, tuple[Bits, Bits]],
                       weights: Mapping[str, float] | None, *, level: float = DEFAULT_LEVEL,
                       resamples: int = W.DEFAULT_RESAMPLES, seed: int = W.DEFAULT_SEED,
                       clusters: tuple[W.Clusters | None, W.Clusters | None] = (None, None)
                       ) -> dict[str, Any] | None:
    """(test - dev) weighted accuracy of the candidate minus the baselines' mean (test - dev), with
    a percentile interval: dev items and test items resampled within domain (whole twin groups
    where ``clusters``, ``(dev, test)``, gives them), the same draw for every model. ``candidate``
    and each baseline: ``(dev bits, test bits)``. None without a pairable baseline."""
    dev_c, test_c = candidate
    usable = {k: v for k, v in baselines.items() if _paired(dev_c, v[0]) and _paired(test_c, v[1])}
    if not usable or not dev_c or not test_c:
        return None
    w_dev, w_test = weights_for(dev_c, weights), weights_for(test_c, weights)
    dev = W.paired_bootstrap({"_c": dev_c, **{k: v[0] for k, v in usable.items()}}, w_dev,
                             resamples=resamples, seed=seed, clusters=_usable(clusters[0], dev_c))
    test = W.paired_bootstrap({"_c": test_c, **{k: v[1] for k, v in usable.items()}}, w_test,
                              resamples=resamples, seed=seed + 1, clusters=_usable(clusters[1], test_c))

    def gap(dev_of, test_of):
        return test_of("_c") - dev_of("_c") - np.mean([test_of(k) - dev_of(k) for k in usable], axis=0)

    point = gap(lambda k: W.weighted_score(dev_c if k == "_c" else usable[k][0], w_dev),
                lambda k: W.weighted_score(test_c if k == "_c" else usable[k][1], w_test))
    draws = gap(dev.__getitem__, test.__getitem__)
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    cand_gap = W.weighted_score(test_c, w_test) - W.weighted_score(dev_c, w_dev)
    return {"merge_gap": cand_gap, "baselines_mean_gap": cand_gap - float(point), "excess_gap": float(point),
            "ci95": [float(low), float(high)], "baselines": sorted(usable),
            "text": (f"dev -> test change of the merge minus the baselines' mean change: {float(point):+.3f} "
                     f"[{low:+.3f}, {high:+.3f}] (weighted accuracy; below 0: the merge lost more than the "
                     "baselines on fresh items, the mark of selection on dev)")}


EXPORTS_FILE = "exports.json"   # one record per export, in the campaign directory


def export_history(directory: Path | None) -> list[dict[str, Any]]:
    """The campaign's ``exports.json`` (one record per export), [] when none."""
    path = Path(directory) / EXPORTS_FILE if directory is not None else None
    if path is None or not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SearchError(f"{path} is unreadable ({' '.join(str(exc).split())[:120]}): restore it from a backup, "
                          "or move it aside to start a new export history") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise SearchError(f"{path} is not a list of export records: restore it from a backup, or move it aside")
    return data


def search_counts(study, directory: Path | None = None) -> dict[str, int]:
    """Trials searched (finished, counted), distinct candidates (recipes scored, baselines
    included), exports and looks at the test split (every export scores it once)."""
    from search import trials as T

    done = T.finished_trials(study)
    digests = {T.view(t).digest or f"#{t.number}" for t in done if t.state != T.TrialState.FAIL}
    exports = export_history(directory)
    return {"trials_searched": len(done), "distinct_candidates": len(digests), "exports": len(exports),
            "test_looks": sum(1 for e in exports if any(r.get("test") is not None for r in e.get("rows", [])))}


def export_claims(dev: Bits, test: Bits, baselines: Mapping[str, tuple[Bits, Bits]],
                  weights: Mapping[str, float] | None, *, counts: Mapping[str, int],
                  alpha: float = DEFAULT_ALPHA, test_clusters: W.Clusters | None = None,
                  dev_clusters: W.Clusters | None = None) -> dict[str, Any]:
    """Everything an export states about the exported merge against the baselines: held-out
    ``verdicts`` on test, ``dev`` comparisons (selected on these items, no verdict), the
    ``generalization_gap`` and the ``counts``. ``baselines``: ``{name: (dev bits, test bits)}``;
    ``test_clusters``, ``dev_clusters``: each split's twin groups (every interval and test counts
    each group once)."""
    return {"verdicts": held_out_verdicts(test, {k: v[1] for k, v in baselines.items()}, weights,
                                          split="test", alpha=alpha, clusters=test_clusters),
            "dev": dev_comparisons(dev, {k: v[0] for k, v in baselines.items()}, weights, clusters=dev_clusters),
            "generalization_gap": generalization_gap((dev, test), baselines, weights,
                                                     clusters=(dev_clusters, test_clusters)),
            "counts": dict(counts)}


def claims_markdown(claims: Mapping[str, Any], escape=lambda s: s) -> str:
    """The card's paragraphs for :func:`export_claims`' result."""
    v = claims["verdicts"]
    out = [f"Verdicts, from the {items_text(v)} only (weighted score, paired "
           "domain-stratified sign-flip test, two-sided p Holm-adjusted over the baselines; 95% "
           f"stratified bootstrap interval; {INTERVAL_NOTE}): the exported model {v['beats_all']['text']}.", ""]
    out += [f"- vs {escape(label)}: {r['text']}" for label, r in v["baselines"].items()] or ["- no baseline completed"]
    out += ["", "On the dev items the trial was selected on (weighted score difference [95% CI], p; "
                "selected on these items, no verdict):", ""]
    out += [f"- vs {escape(label)}: {r['text'] if r else 'no per-item evidence'}" for label, r in claims["dev"].items()]
    gap = claims.get("generalization_gap")
    if gap:
        out += ["", f"Generalization: {gap['text']}."]
    c = claims["counts"]
    out += ["", f"Counts: {c['trials_searched']} trials searched, {c['distinct_candidates']} distinct candidates, "
                f"{c['exports']} exports, {c['test_looks']} looks at the test split (this export included)."]
    return "\n".join(out)
