"""The weighted-score test and interval against brute-force references on small item sets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from evals import weighted_stats as W
from evals.stats import mcnemar_exact, paired_counts


def _reference_flip_p(a, b, weights):
    """Every assignment of the labels A/B on every item, equally likely: swap them literally
    and recompute the two weighted scores (no shortcut shared with the module)."""
    return _reference_cluster_flip_p(a, b, weights, {d: [""] * len(v) for d, v in a.items()})


def _random_case(rng, sizes, binary):
    a, b = {}, {}
    for k, n in enumerate(sizes):
        d = f"d{k}"
        if binary:
            a[d] = list(rng.random(n) < 0.6)
            b[d] = list(rng.random(n) < 0.5)
        else:
            a[d] = list(np.round(rng.random(n), 3))
            b[d] = list(np.round(rng.random(n), 3))
    return a, b


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("binary", [True, False])
def test_sign_flip_p_equals_full_enumeration(seed, binary):
    rng = np.random.default_rng(seed)
    a, b = _random_case(rng, (5, 4, 3), binary)
    weights = {"d0": 3.0, "d1": 1.0, "d2": 0.5}
    two, less, greater, exact = W.sign_flip_p(a, b, weights)
    assert exact
    ref = _reference_flip_p(a, b, weights)
    assert (two, less, greater) == pytest.approx(ref, abs=1e-12)


def test_equal_weights_one_domain_reduces_to_exact_mcnemar():
    """One domain of 0/1 scores: the sign-flip test *is* McNemar's exact test."""
    rng = np.random.default_rng(3)
    a, b = _random_case(rng, (40,), True)
    _, only_a, only_b, _ = paired_counts(a["d0"], b["d0"])
    two, less, greater, _ = W.sign_flip_p(a, b, {"d0": 1.0})
    assert less == pytest.approx(mcnemar_exact(only_a, only_b, "less"), abs=1e-12)
    assert greater == pytest.approx(mcnemar_exact(only_a, only_b, "greater"), abs=1e-12)
    assert two == pytest.approx(mcnemar_exact(only_a, only_b), abs=1e-12)


def test_random_flips_approach_the_exact_p():
    """20 non-zero float differences: past the enumeration limit, so seeded random flips; the
    exact value comes from enumerating all 2^20 flips here."""
    rng = np.random.default_rng(11)
    a = {"x": list(rng.random(12) * 0.6 + 0.3), "y": list(rng.random(8))}
    b = {"x": list(rng.random(12) * 0.6), "y": list(rng.random(8))}
    weights = {"x": 2.0, "y": 1.0}
    x, c, _, binary = W._design(a, b, weights)
    assert not binary and (x != 0).sum() > W.EXACT_FLIPS_MAX
    values, _ = W._enumerated_null((c * x)[x != 0])
    t = float((c * x).sum())
    exact_greater = float(np.mean(values >= t - 1e-12))
    _, _, greater, exact = W.sign_flip_p(a, b, weights, resamples=40000, seed=5)
    assert not exact
    assert greater == pytest.approx(exact_greater, abs=0.006)   # ~4 Monte-Carlo standard errors


def test_bootstrap_matches_exhaustive_resampling():
    """Domains of 3 and 4 items: all 3^3 * 4^4 within-domain resamples, equally likely, give the
    exact bootstrap law of the weighted difference; the seeded draws must follow it."""
    a = {"p": [1, 0, 1], "q": [1, 1, 0, 1]}
    b = {"p": [0, 0, 1], "q": [0, 1, 1, 0]}
    weights = {"p": 3.0, "q": 1.0}
    x_p = np.array(a["p"]) - np.array(b["p"])
    x_q = np.array(a["q"]) - np.array(b["q"])
    exact = [0.75 * x_p[list(i)].mean() + 0.25 * x_q[list(j)].mean()
             for i in itertools.product(range(3), repeat=3) for j in itertools.product(range(4), repeat=4)]
    exact = np.sort(np.round(exact, 12))
    draws = np.round(W.bootstrap_draws(a, b, weights, resamples=30000, seed=2), 12)
    atoms = np.unique(exact)
    cdf_exact = np.searchsorted(exact, atoms, side="right") / exact.size
    cdf_draws = np.searchsorted(np.sort(draws), atoms, side="right") / draws.size
    assert set(np.unique(draws)) <= set(atoms)
    assert np.abs(cdf_exact - cdf_draws).max() < 0.012
    cmp = W.weighted_comparison(a, b, weights, resamples=30000, seed=2)
    low, high = np.quantile(W.bootstrap_draws(a, b, weights, resamples=30000, seed=2), [0.025, 0.975])
    assert (cmp.low, cmp.high) == (pytest.approx(low), pytest.approx(high))
    assert cmp.diff == pytest.approx(0.75 * x_p.mean() + 0.25 * x_q.mean())


def test_weights_change_the_verdict_where_pooled_accuracy_does_not():
    """Domain weights 3:1. The candidate is 0.30 worse on the heavy domain and 0.30 better on the
    light one: pooled accuracy ties exactly (McNemar p = 1), the weighted score is 0.15 worse."""
    heavy_inc = [True] * 28 + [False] * 12
    heavy_cand = [True] * 16 + [False] * 24
    light_inc = [True] * 16 + [False] * 24
    light_cand = [True] * 28 + [False] * 12
    cand, inc = {"h": heavy_cand, "l": light_cand}, {"h": heavy_inc, "l": light_inc}
    _, only_c, only_i, _ = paired_counts(heavy_cand + light_cand, heavy_inc + light_inc)
    assert mcnemar_exact(only_c, only_i, "less") > 0.5
    cmp = W.weighted_comparison(cand, inc, {"h": 3.0, "l": 1.0})
    assert cmp.diff == pytest.approx(-0.15)
    assert cmp.p_less < 0.05 and cmp.p_value < 0.05 and cmp.high < 0
    assert W.weighted_verdict(cmp) == "worse"


def test_identical_models_and_determinism():
    a = {"d": [True, False, True, True]}
    cmp = W.weighted_comparison(a, a, {"d": 1.0})
    assert (cmp.p_value, cmp.p_less, cmp.p_greater, cmp.low, cmp.high, cmp.discordant) == (1, 1, 1, 0, 0, 0)
    rng = np.random.default_rng(0)
    x, y = _random_case(rng, (30, 25), False)
    one = W.weighted_comparison(x, y, {"d0": 1, "d1": 2}, seed=7)
    assert one == W.weighted_comparison(x, y, {"d0": 1, "d1": 2}, seed=7)


@pytest.mark.parametrize("seed", range(20))
def test_verdict_never_contradicts_the_interval(seed):
    rng = np.random.default_rng(100 + seed)
    a, b = _random_case(rng, (25, 15), True)
    cmp = W.weighted_comparison(a, b, {"d0": 1.0, "d1": 0.5}, resamples=1000)
    text = W.format_weighted(cmp, ascii=True)
    v = W.weighted_verdict(cmp)
    assert text.endswith(v)
    if v == "better":
        assert cmp.low > 0 and cmp.p_value <= 0.05
    elif v == "worse":
        assert cmp.high < 0 and cmp.p_value <= 0.05
    else:
        assert cmp.p_value > 0.05 or cmp.low <= 0 <= cmp.high


def test_score_interval_brackets_the_score_and_mismatches_raise():
    vals = {"a": [1, 0, 1, 1, 0, 1], "b": [0, 1, 1]}
    low, high = W.score_interval(vals, {"a": 1.0, "b": 1.0})
    assert low <= W.weighted_score(vals, {"a": 1.0, "b": 1.0}) <= high and low < high
    with pytest.raises(ValueError, match="same items"):
        W.weighted_comparison({"a": [1, 0]}, {"a": [1]}, {"a": 1.0})
    with pytest.raises(ValueError, match="same weighted domains"):
        W.weighted_comparison({"a": [1]}, {"b": [1]}, {"a": 1.0, "b": 1.0})


# -- clustered items (two wordings of one question, twin pairs) ------------------------------------

def _reference_cluster_flip_p(a, b, weights, clusters):
    """Every assignment of the labels A/B per *cluster* (all items of a cluster swap together),
    equally likely: swap them literally and recompute the two weighted scores."""
    domains = sorted(a)
    units = sorted({(d, clusters[d][i] or f"#{i}") for d in domains for i in range(len(a[d]))})
    t = W.weighted_score(a, weights) - W.weighted_score(b, weights)
    diffs = []
    for flips in itertools.product((False, True), repeat=len(units)):
        swap = {u for u, f in zip(units, flips) if f}
        sa = {d: list(a[d]) for d in domains}
        sb = {d: list(b[d]) for d in domains}
        for d in domains:
            for i in range(len(a[d])):
                if (d, clusters[d][i] or f"#{i}") in swap:
                    sa[d][i], sb[d][i] = sb[d][i], sa[d][i]
        diffs.append(W.weighted_score(sa, weights) - W.weighted_score(sb, weights))
    diffs = np.array(diffs)
    eps = 1e-12
    return (float(np.mean(np.abs(diffs) >= abs(t) - eps)), float(np.mean(diffs <= t + eps)),
            float(np.mean(diffs >= t - eps)))


def _random_clusters(rng, a):
    """Clusters of 1-3 items; some items left on their own ("")."""
    out = {}
    for d, v in a.items():
        labels = [f"g{int(rng.integers(0, max(1, len(v) // 2)))}" for _ in v]
        labels[0] = ""
        out[d] = labels
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("binary", [True, False])
def test_clustered_sign_flip_equals_full_enumeration_over_clusters(seed, binary):
    rng = np.random.default_rng(100 + seed)
    a, b = _random_case(rng, (7, 5, 4), binary)
    clusters = _random_clusters(rng, a)
    weights = {"d0": 3.0, "d1": 1.0, "d2": 0.5}
    two, less, greater, exact = W.sign_flip_p(a, b, weights, clusters=clusters)
    assert exact
    assert (two, less, greater) == pytest.approx(_reference_cluster_flip_p(a, b, weights, clusters), abs=1e-12)


def test_asking_each_question_twice_adds_no_evidence_when_clustered():
    """Every item duplicated (the same answers twice, as two wordings of one fact that a model
    always gets both right or both wrong): item-level, the p-value falls as if the evidence had
    doubled; clustered, it is exactly the single copy's p and interval."""
    rng = np.random.default_rng(7)
    a, b = _random_case(rng, (40, 30), binary=True)
    weights = {"d0": 2.0, "d1": 1.0}
    twice = lambda v: {d: [x for x in xs for _ in (0, 1)] for d, xs in v.items()}  # noqa: E731
    clusters = {d: [f"q{i}" for i in range(len(xs)) for _ in (0, 1)] for d, xs in a.items()}
    once = W.weighted_comparison(a, b, weights)
    naive = W.weighted_comparison(twice(a), twice(b), weights)
    honest = W.weighted_comparison(twice(a), twice(b), weights, clusters=clusters)
    assert once.p_value < 1 and naive.p_value < once.p_value          # the naive test overstates
    assert honest.p_value == pytest.approx(once.p_value, abs=1e-12)
    assert (honest.p_less, honest.p_greater) == pytest.approx((once.p_less, once.p_greater), abs=1e-12)
    assert (honest.low, honest.high) == pytest.approx((once.low, once.high), abs=1e-12)
    assert honest.units == once.units == 70 and naive.units == 140 and honest.n == 140


def test_singleton_clusters_are_the_item_level_procedures():
    rng = np.random.default_rng(3)
    a, b = _random_case(rng, (25, 18), binary=False)
    weights = {"d0": 1.0, "d1": 1.0}
    alone = {d: [f"i{k}" for k in range(len(v))] for d, v in a.items()}
    blank = {d: [""] * len(v) for d, v in a.items()}
    ref = W.weighted_comparison(a, b, weights)
    for clusters in (alone, blank):
        assert W.weighted_comparison(a, b, weights, clusters=clusters) == ref


def test_clustered_bootstrap_resamples_clusters_within_domains():
    """A domain of two clusters with opposite means: every draw is one of the three mixtures
    of those two clusters (never a mixture of single items), and the other domain, one item
    per cluster, adds its item-level draws."""
    a = {"d0": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], "d1": [1.0]}
    b = {"d0": [0.0] * 6, "d1": [1.0]}
    clusters = {"d0": ["x", "x", "x", "y", "y", "y"], "d1": [""]}
    draws = W.bootstrap_draws(a, b, {"d0": 1.0, "d1": 1.0}, resamples=2000, seed=1, clusters=clusters)
    assert set(np.round(draws, 12)) == {0.0, 0.25, 0.5}
    assert np.mean(draws == 0.25) == pytest.approx(0.5, abs=0.05)


def test_paired_bootstrap_resamples_whole_clusters_for_every_model():
    """Every item duplicated into a twin group: the clustered paired draws are the single
    copy's item-level draws (same seed), for every model; blank labels are the item level."""
    rng = np.random.default_rng(11)
    a, b = _random_case(rng, (30, 20), binary=True)
    weights = {"d0": 2.0, "d1": 1.0}
    twice = lambda v: {d: [x for x in xs for _ in (0, 1)] for d, xs in v.items()}  # noqa: E731
    clusters = {d: [f"q{i}" for i in range(len(xs)) for _ in (0, 1)] for d, xs in a.items()}
    once = W.paired_bootstrap({"a": a, "b": b}, weights, resamples=500, seed=4)
    honest = W.paired_bootstrap({"a": twice(a), "b": twice(b)}, weights, resamples=500, seed=4, clusters=clusters)
    naive = W.paired_bootstrap({"a": twice(a), "b": twice(b)}, weights, resamples=500, seed=4)
    for name in ("a", "b"):
        assert honest[name] == pytest.approx(once[name], abs=1e-12)
    assert np.std(naive["a"]) < 0.8 * np.std(once["a"])            # the naive draws are too narrow
    blank = {d: [""] * len(v) for d, v in a.items()}
    assert all(np.array_equal(W.paired_bootstrap({"a": a, "b": b}, weights, resamples=500, seed=4,
                                                 clusters=blank)[k], once[k]) for k in once)


def test_cluster_labels_must_cover_every_item():
    a, b = {"d0": [True, False]}, {"d0": [False, False]}
    with pytest.raises(ValueError, match="2 items"):
        W.sign_flip_p(a, b, {"d0": 1.0}, clusters={"d0": ["x"]})
