"""Paired, domain-stratified inference for the *weighted* score, the quantity a search maximizes.

The weighted score of a model is ``sum_d w_d * mean_i(s_di) / sum_d w_d``, where ``s_di`` is
the model's score on item ``i`` of domain ``d`` (correctness, or ``(1 - t)·correct + t·gold_prob``
when per-item gold probabilities are given: see ``evals.fitness``). Two models A and B scored on
the same items differ by ``D = sum_i c_i · x_i`` with ``x_i = s_A,i - s_B,i`` and the fixed item
weight ``c_i = w_d / (W · n_d)``. Pooled accuracy weighs every item alike; ``D`` does not, so a
test on pooled accuracy can call a candidate worse while its weighted score is higher.

- **p-value: stratified paired sign-flip (permutation) test.** Under H0 "A and B are
  exchangeable on every item" each ``x_i`` is equally likely to have either sign, independently;
  the null distribution of ``D`` is that of ``sum_i c_i · (±x_i)``. Items stay in their domain
  (their weight ``c_i`` is their domain's), so the test is stratified by construction.
  Computed exactly when it is cheap — for 0/1 scores by convolving one binomial per domain, for
  other scores by enumerating all ``2^m`` flips of the ``m`` non-zero differences (m <= 16) —
  and otherwise by ``resamples`` seeded random flips, ``p = (1 + hits) / (1 + resamples)``
  (never 0; valid at any number of draws).
- **interval: stratified paired bootstrap.** Items are resampled with replacement *within each
  domain* (each domain keeps its size), and the percentile interval of ``D`` is reported.

**Clustered items.** Items that are not independent (two wordings of one question, a
true/false twin pair: the loader's ``pair_id``) can be given as ``clusters``, a label per item
(per domain; "" leaves an item on its own). The test then flips the sign of each cluster's
summed difference as one unit and the bootstrap resamples clusters within their domain (the
ratio of the drawn clusters' summed differences to their item count): two items that always
agree count as one unit of evidence, not two, and the p-value is not made smaller by asking
the same thing twice. With no clusters (or all of size one) both are exactly the item-level
procedures above. For 0/1 scores the clustered null stays exact: a cluster's summed
difference is an integer ``k``, and the clusters of one magnitude in one domain contribute
``c_d·k·(2K - m)`` with ``K ~ Binomial(m, 1/2)``, convolved as before.

Where they can differ: the two come from different procedures, so near the boundary the
interval can exclude 0 while ``p > alpha`` or the reverse (the bootstrap is a little
anti-conservative on few items). :func:`weighted_verdict` says "better" / "worse" only when
*both* agree (``p <= alpha`` and the interval on the same side of 0), so a verdict word never
contradicts the interval shown beside it. Everything is seeded: the same inputs give the same
numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from evals.stats import DEFAULT_ALPHA, DEFAULT_LEVEL, MINUS, Alternative, _p_text, _signed

DEFAULT_RESAMPLES = 4000    # bootstrap draws / random flips: Monte-Carlo error of p ~ 0.003 at p = 0.05
DEFAULT_SEED = 0            # fixed: a report shows the same interval every time it is printed
EXACT_FLIPS_MAX = 16        # enumerate 2^m sign flips of general scores up to m = 16 (65 536)
EXACT_ATOMS_MAX = 400_000   # 0/1 scores: exact convolution while the support stays this small
_EPS = 1e-12                # ties in float sums: equal within rounding counts as "as extreme"

Items = Mapping[str, Sequence[float]]


@dataclass(frozen=True)
class WeightedComparison:
    """A against B on the weighted score, on the same items of the same domains."""

    score_a: float
    score_b: float
    low: float              # stratified bootstrap percentile interval for score_a - score_b
    high: float
    p_value: float          # sign-flip, two-sided
    p_less: float           # sign-flip, H1: A worse than B
    p_greater: float        # sign-flip, H1: A better than B
    n: int                  # items
    discordant: int         # items whose scores differ (the only ones the test uses)
    exact: bool             # p-values exact (True) or from seeded random flips
    level: float
    resamples: int
    seed: int
    units: int = 0          # independent units the test flips: clusters, or items when none given

    @property
    def diff(self) -> float:
        return self.score_a - self.score_b

    def p(self, alternative: Alternative = "two-sided") -> float:
        return {"two-sided": self.p_value, "less": self.p_less, "greater": self.p_greater}[alternative]


def _design(a: Items, b: Items, weights: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, c, domain index, scores-are-0/1 flag) over the items of the domains with a weight > 0."""
    domains = sorted(d for d in a if weights.get(d, 0) > 0)
    if sorted(d for d in b if weights.get(d, 0) > 0) != domains or not domains:
        raise ValueError(f"weighted comparison: A has domains {sorted(a)}, B {sorted(b)} (weights for "
                         f"{sorted(weights)}); both must be scored on the same weighted domains")
    total = sum(float(weights[d]) for d in domains)
    xs, cs, ds = [], [], []
    for k, d in enumerate(domains):
        va, vb = np.asarray(a[d], dtype=float), np.asarray(b[d], dtype=float)
        if va.shape != vb.shape or va.ndim != 1 or not len(va):
            raise ValueError(f"domain {d!r}: {va.size} and {vb.size} items; both models must be scored "
                             "on the same items, in the same order")
        xs.append(va - vb)
        cs.append(np.full(len(va), float(weights[d]) / (total * len(va))))
        ds.append(np.full(len(va), k))
    x, c = np.concatenate(xs), np.concatenate(cs)
    return x, c, np.concatenate(ds), np.isin(x, (-1.0, 0.0, 1.0)).all()


Clusters = Mapping[str, Sequence[str]]


def labels_every_item(clusters: Clusters | None, values: Items) -> bool:
    """Do ``clusters`` give exactly one label to each of ``values``' items, domain by domain?"""
    return bool(clusters) and sorted(clusters) == sorted(values) and all(
        len(clusters[d]) == len(values[d]) for d in values)


def _groups(a: Items, weights: Mapping[str, float], clusters: Clusters | None) -> np.ndarray | None:
    """A group index per item, in ``_design``'s order (domains sorted, items in order), or None
    when every item is its own group (no clusters given, or none with two items)."""
    if clusters is None:
        return None
    domains = sorted(d for d in a if weights.get(d, 0) > 0)
    labels: list[tuple[int, str]] = []
    for k, d in enumerate(domains):
        given = list(clusters.get(d, ()))
        if len(given) != len(a[d]):
            raise ValueError(f"domain {d!r}: {len(given)} cluster labels for {len(a[d])} items; give one label "
                             "per item, in the items' order (\"\" for an item on its own)")
        labels += [(k, str(g)) if g else (k, f"\0item{i}") for i, g in enumerate(given)]
    _, first, g = np.unique(np.array([f"{k}\x1f{lab}" for k, lab in labels]), return_index=True,
                            return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(first.size)   # groups numbered in order of first appearance,
    g = rank[g.ravel()]                               # so that groups of one item draw as the items do
    return None if np.bincount(g).max() <= 1 else g


def weighted_score(values: Items, weights: Mapping[str, float]) -> float:
    """``sum_d w_d · mean(values[d]) / sum_d w_d`` over the domains with a weight > 0."""
    domains = [d for d in values if weights.get(d, 0) > 0]
    total = sum(float(weights[d]) for d in domains)
    return sum(float(weights[d]) * float(np.mean(values[d])) for d in domains) / total


# -- the sign-flip null distribution -------------------------------------------------------------

def _binary_null(x: np.ndarray, c: np.ndarray, dom: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact null of ``D`` for differences in {-1, 0, 1}: per domain, ``c_d · (2K - m_d)`` with
    ``K ~ Binomial(m_d, 1/2)``; domains independent, so the law is their convolution.
    (values, probabilities), or None when the support would exceed ``EXACT_ATOMS_MAX``."""
    blocks = []
    for k in np.unique(dom):
        m = int(((dom == k) & (x != 0)).sum())
        if m:
            blocks.append((float(c[dom == k][0]), m))
    return _blocks_null(blocks)


def _clustered_binary_null(x: np.ndarray, c: np.ndarray, dom: np.ndarray, g: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact null of ``D`` when each cluster's sign flips as one: a cluster of domain ``d`` with
    summed difference ``k`` (an integer) adds ``±c_d·|k|``; the clusters of one domain and one
    magnitude form one binomial block."""
    sums = np.bincount(g, weights=x)
    gdom = np.zeros(sums.size, dtype=int)
    gdom[g] = dom
    blocks = []
    for k in np.unique(dom):
        mags = np.abs(np.round(sums[gdom == k])).astype(np.int64)
        cd = float(c[dom == k][0])
        for mag, m in zip(*np.unique(mags[mags > 0], return_counts=True)):
            blocks.append((cd * float(mag), int(m)))
    return _blocks_null(blocks)


def _blocks_null(blocks: Sequence[tuple[float, int]]) -> tuple[np.ndarray, np.ndarray] | None:
    """The law of ``sum_b scale_b · (2K_b - m_b)``, ``K_b ~ Binomial(m_b, 1/2)`` independent."""
    values, probs = np.zeros(1), np.ones(1)
    for cd, m in blocks:
        if values.size * (m + 1) > EXACT_ATOMS_MAX:
            return None
        kv = np.arange(m + 1)
        pk = np.array([math.comb(m, i) for i in kv], dtype=float) / 2.0 ** m
        v = (values[:, None] + cd * (2 * kv - m)[None, :]).ravel()
        p = (probs[:, None] * pk[None, :]).ravel()
        # merge equal sums (domains with commensurate weights give many), rounding off float noise
        key = np.round(v / _EPS).astype(np.int64) if np.abs(v).max() < 1e6 else v
        uniq, inv = np.unique(key, return_inverse=True)
        values = np.bincount(inv, weights=v, minlength=uniq.size) / np.bincount(inv, minlength=uniq.size)
        probs = np.bincount(inv, weights=p, minlength=uniq.size)
    return values, probs


def _enumerated_null(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All ``2^m`` sign patterns of the non-zero weighted differences ``y = c·x``, equally likely."""
    m = y.size
    signs = 1 - 2 * ((np.arange(2 ** m)[:, None] >> np.arange(m)[None, :]) & 1)   # [2^m, m]
    return signs @ y, np.full(2 ** m, 1.0 / 2 ** m)


def sign_flip_p(a: Items, b: Items, weights: Mapping[str, float], *, resamples: int = DEFAULT_RESAMPLES,
                seed: int = DEFAULT_SEED, clusters: Clusters | None = None) -> tuple[float, float, float, bool]:
    """(two-sided, less, greater, exact) p-values of the stratified paired sign-flip test of
    ``weighted(A) - weighted(B)``; "less" is H1 "A is worse". ``clusters``: see the module."""
    x, c, dom, binary = _design(a, b, weights)
    return _sign_flip(x, c, dom, binary, resamples=resamples, seed=seed, groups=_groups(a, weights, clusters))


def _sign_flip(x, c, dom, binary, *, resamples: int, seed: int,
               groups: np.ndarray | None = None) -> tuple[float, float, float, bool]:
    y = c * x
    t = float(y.sum())
    if groups is None:
        nz = y[x != 0]
        null = _binary_null(x, c, dom) if binary and nz.size else None
    else:                                   # one sign per cluster: its summed weighted difference
        sums = np.bincount(groups, weights=y)
        nz = sums[np.abs(sums) > _EPS * max(1.0, float(np.abs(y).max(initial=0.0)))]
        null = _clustered_binary_null(x, c, dom, groups) if binary and nz.size else None
    if not nz.size:
        return 1.0, 1.0, 1.0, True
    if null is None and nz.size <= EXACT_FLIPS_MAX:
        null = _enumerated_null(nz)
    if null is not None:
        v, p = null
        tol = _EPS * max(1.0, abs(t))
        return (min(1.0, float(p[np.abs(v) >= abs(t) - tol].sum())), min(1.0, float(p[v <= t + tol].sum())),
                min(1.0, float(p[v >= t - tol].sum())), True)
    rng = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for start in range(0, resamples, 1024):        # chunks: [chunk, m] signs, bounded memory
        k = min(1024, resamples - start)
        signs = rng.integers(0, 2, size=(k, nz.size)) * 2 - 1
        draws[start:start + k] = signs @ nz
    tol = _EPS * max(1.0, abs(t))

    def mc(hits: int) -> float:
        return (1 + hits) / (1 + resamples)
    return (mc(int((np.abs(draws) >= abs(t) - tol).sum())), mc(int((draws <= t + tol).sum())),
            mc(int((draws >= t - tol).sum())), False)


# -- the stratified bootstrap ----------------------------------------------------------------------

def bootstrap_draws(a: Items, b: Items, weights: Mapping[str, float], *, resamples: int = DEFAULT_RESAMPLES,
                    seed: int = DEFAULT_SEED, clusters: Clusters | None = None) -> np.ndarray:
    """``resamples`` draws of ``D`` with the items of each domain resampled with replacement
    (with ``clusters``: the clusters of each domain, each draw's mean over the items drawn)."""
    x, c, dom, _ = _design(a, b, weights)
    return _bootstrap(x, c, dom, _groups(a, weights, clusters), resamples=resamples, seed=seed)


def _bootstrap(x, c, dom, groups: np.ndarray | None, *, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros(resamples)
    for k in np.unique(dom):
        xd = x[dom == k]
        wd = float(c[dom == k][0]) * xd.size            # the domain's share w_d / W
        if groups is None:
            idx = rng.integers(0, xd.size, size=(resamples, xd.size))
            out += wd * xd[idx].mean(axis=1)
            continue
        gd, idx, drawn = _cluster_draw(groups[dom == k], rng, resamples)
        out += wd * np.bincount(gd, weights=xd)[idx].sum(axis=1) / drawn
    return out


def _cluster_draw(labels: np.ndarray, rng: np.random.Generator, resamples: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One domain's clusters resampled with replacement: (each item's cluster, the clusters
    drawn in each resample, the items they hold); a draw's score is the drawn clusters' summed
    values over the items drawn (the ratio estimator)."""
    _, gd = np.unique(labels, return_inverse=True)
    sizes = np.bincount(gd).astype(float)
    idx = rng.integers(0, sizes.size, size=(resamples, sizes.size))
    return gd, idx, sizes[idx].sum(axis=1)


def units(values: Items, weights: Mapping[str, float], clusters: Clusters | None = None) -> int:
    """The independent units a test of ``values``' items has: their clusters, or the items."""
    groups = _groups(values, weights, clusters)
    n = sum(len(values[d]) for d in values if weights.get(d, 0) > 0)
    return n if groups is None else int(groups.max() + 1)


def weighted_comparison(a: Items, b: Items, weights: Mapping[str, float], *, level: float = DEFAULT_LEVEL,
                        resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                        clusters: Clusters | None = None) -> WeightedComparison:
    """A against B on the weighted score: the difference, its stratified bootstrap interval and
    the stratified sign-flip p-values. ``a[d]`` / ``b[d]``: per-item scores of domain ``d``
    (booleans or floats in [0, 1]), same items in the same order; ``clusters``: a label per item
    for items that are not independent (see the module)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: a confidence level lies strictly between 0 and 1, e.g. 0.95")
    x, c, dom, binary = _design(a, b, weights)
    groups = _groups(a, weights, clusters)
    two, less, greater, exact = _sign_flip(x, c, dom, binary, resamples=resamples, seed=seed, groups=groups)
    draws = _bootstrap(x, c, dom, groups, resamples=resamples, seed=seed)
    low, high = (float(q) for q in np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]))
    return WeightedComparison(score_a=weighted_score(a, weights), score_b=weighted_score(b, weights),
                              low=low, high=high, p_value=two, p_less=less, p_greater=greater,
                              n=int(x.size), discordant=int((x != 0).sum()), exact=exact, level=level,
                              resamples=resamples, seed=seed,
                              units=int(x.size if groups is None else groups.max() + 1))


def weighted_verdict(cmp: WeightedComparison, *, alpha: float = DEFAULT_ALPHA,
                     p_value: float | None = None) -> str:
    """"better" / "worse" when the two-sided p (or ``p_value``, e.g. Holm-adjusted) is ``<= alpha``
    *and* the interval lies on that side of 0; else "not distinguishable at this size"."""
    p = cmp.p_value if p_value is None else p_value
    if p <= alpha and cmp.low > 0 and cmp.diff > 0:
        return "better"
    if p <= alpha and cmp.high < 0 and cmp.diff < 0:
        return "worse"
    return "not distinguishable at this size"


def format_weighted(cmp: WeightedComparison, *, alpha: float = DEFAULT_ALPHA, verdict_text: bool = True,
                    ascii: bool = False, p_value: float | None = None) -> str:
    """``+0.041 [+0.01, +0.07], p = 0.012: better`` (weighted A minus B, bootstrap interval,
    sign-flip p or the given adjusted one, and the verdict)."""
    minus = "-" if ascii else MINUS
    p = cmp.p_value if p_value is None else p_value
    text = (f"{_signed(cmp.diff, 3, minus)} [{_signed(cmp.low, 3, minus)}, {_signed(cmp.high, 3, minus)}], "
            f"{_p_text(p)}")
    return f"{text}: {weighted_verdict(cmp, alpha=alpha, p_value=p_value)}" if verdict_text else text


def score_interval(values: Items, weights: Mapping[str, float], *, level: float = DEFAULT_LEVEL,
                   resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                   clusters: Clusters | None = None) -> tuple[float, float]:
    """A stratified bootstrap percentile interval for one model's weighted score."""
    zeros = {d: [0.0] * len(v) for d, v in values.items()}
    draws = bootstrap_draws(values, zeros, weights, resamples=resamples, seed=seed, clusters=clusters)
    return tuple(float(q) for q in np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]))  # type: ignore[return-value]


def paired_bootstrap(models: Mapping[str, Items], weights: Mapping[str, float], *,
                     resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                     clusters: Clusters | None = None) -> dict[str, np.ndarray]:
    """Bootstrap draws of each model's weighted score with the *same* within-domain resample of
    the items for every model (they stay paired), ``{model: [resamples]}``. ``clusters``: a label
    per item (see the module): whole clusters are resampled, each draw's score the mean over the
    items drawn; without them (or with clusters of one item) exactly the item-level draws."""
    names = list(models)
    if not names:
        return {}
    domains = sorted(d for d in models[names[0]] if weights.get(d, 0) > 0)
    for name in names:
        mine = sorted(d for d in models[name] if weights.get(d, 0) > 0)
        if mine != domains or any(len(models[name][d]) != len(models[names[0]][d]) for d in domains):
            raise ValueError(f"paired bootstrap: model {name!r} was scored on other items than {names[0]!r}")
    groups = _groups(models[names[0]], weights, clusters)
    total = sum(float(weights[d]) for d in domains)
    rng = np.random.default_rng(seed)
    out = {name: np.zeros(resamples) for name in names}
    start = 0
    for d in domains:
        n = len(models[names[0]][d])
        share = float(weights[d]) / total
        if groups is None:
            idx = rng.integers(0, n, size=(resamples, n))
            for name in names:
                out[name] += share * np.asarray(models[name][d], dtype=float)[idx].mean(axis=1)
        else:
            gd, idx, drawn = _cluster_draw(groups[start:start + n], rng, resamples)
            for name in names:
                sums = np.bincount(gd, weights=np.asarray(models[name][d], dtype=float))
                out[name] += share * sums[idx].sum(axis=1) / drawn
        start += n
    return out
