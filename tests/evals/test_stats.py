"""evals.stats against values computed independently: exact binomial sums in integers,
scipy.stats where it is installed, and published examples."""

from __future__ import annotations

import hashlib
import math
import random
from fractions import Fraction

import pytest

from evals import stats
from evals.stats import (
    PairedComparison,
    decode_bits,
    encode_bits,
    format_accuracy,
    format_comparison,
    items_digest,
    mcnemar_exact,
    min_items_for_significance,
    newcombe_paired_interval,
    paired_comparison,
    paired_counts,
    verdict,
    wilson_interval,
)

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def _tail_le(k: int, n: int) -> Fraction:
    """P(X <= k), X ~ Binomial(n, 1/2), as an exact fraction."""
    return Fraction(sum(math.comb(n, i) for i in range(0, k + 1)), 2 ** n)


def _pairs(both: int, only_a: int, only_b: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * both + [True] * only_a + [False] * only_b + [False] * neither
    b = [True] * both + [False] * only_a + [True] * only_b + [False] * neither
    return a, b


# -- Wilson -------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,n,low,high", [
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_published_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-5)
    assert hi == pytest.approx(high, abs=5e-5)


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (3, 7), (11, 18), (18, 18), (50, 200), (199, 200)])
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_wilson_matches_the_closed_form_and_scipy(k, n, level):
    z = {0.9: 1.6448536269514722, 0.95: Z95, 0.99: 2.5758293035489004}[level]
    p = k / n
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(n) / (n + z * z) * math.sqrt(p * (1 - p) + z * z / (4 * n))
    lo, hi = wilson_interval(k, n, level)
    assert lo == pytest.approx(max(0.0, centre - half), abs=1e-12)
    assert hi == pytest.approx(min(1.0, centre + half), abs=1e-12)
    sps = pytest.importorskip("scipy.stats")
    ci = sps.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 18)
    assert lo == 0.0 and 0.0 < hi < 0.2
    lo, hi = wilson_interval(18, 18)
    assert hi == 1.0 and 0.8 < lo < 1.0       # not the degenerate [1, 1] of the Wald interval
    for bad in [(-1, 3), (4, 3), (0, -1)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)
    with pytest.raises(ValueError, match="level"):
        wilson_interval(1, 2, level=95)


def test_format_accuracy():
    lo, hi = wilson_interval(11, 18)
    assert format_accuracy(11, 18) == f"0.611 [{lo:.2f}, {hi:.2f}] (11/18)"
    assert format_accuracy(0, 0) == "no items"


# -- McNemar exact ------------------------------------------------------------------------------

@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (1, 0), (0, 5), (5, 0), (3, 3), (2, 9), (9, 2), (12, 30),
                                 (40, 41), (0, 60)])
def test_mcnemar_against_exact_binomial_sums(b, c):
    n = b + c
    if n == 0:
        assert mcnemar_exact(b, c) == mcnemar_exact(b, c, "less") == mcnemar_exact(b, c, "greater") == 1.0
        return
    less = _tail_le(b, n)
    greater = 1 - _tail_le(b - 1, n)
    two = min(Fraction(1), 2 * _tail_le(min(b, c), n))
    assert mcnemar_exact(b, c, "less") == pytest.approx(float(less), rel=1e-12)
    assert mcnemar_exact(b, c, "greater") == pytest.approx(float(greater), rel=1e-12)
    assert mcnemar_exact(b, c) == pytest.approx(float(two), rel=1e-12)
    assert mcnemar_exact(b, c, "two-sided") == mcnemar_exact(c, b, "two-sided")   # symmetric
    assert mcnemar_exact(b, c, "less") == mcnemar_exact(c, b, "greater")


@pytest.mark.parametrize("b,c", [(0, 5), (2, 9), (9, 2), (7, 7), (12, 30), (1, 0)])
@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_mcnemar_matches_scipy_binomtest(b, c, alternative):
    sps = pytest.importorskip("scipy.stats")
    expected = sps.binomtest(b, b + c, 0.5, alternative=alternative).pvalue
    assert mcnemar_exact(b, c, alternative) == pytest.approx(expected, rel=1e-10)


def test_mcnemar_known_values_and_errors():
    assert mcnemar_exact(0, 5, "less") == 1 / 32           # all discordant pairs against A
    assert mcnemar_exact(0, 5) == 2 / 32
    assert mcnemar_exact(0, 5, "greater") == 1.0
    assert mcnemar_exact(4, 8) == pytest.approx(2 * (1 + 12 + 66 + 220 + 495) / 4096)
    with pytest.raises(ValueError, match="negative"):
        mcnemar_exact(-1, 2)
    with pytest.raises(ValueError, match="alternative"):
        mcnemar_exact(1, 2, "two_sided")  # type: ignore[arg-type]


def test_min_items_for_significance():
    assert min_items_for_significance(0.05) == 5
    assert min_items_for_significance() == 5
    assert min_items_for_significance(0.01) == 7
    assert min_items_for_significance(0.05, alternative="two-sided") == 6
    assert min_items_for_significance(0.05, alternative="greater") == 5
    for alpha in [0.5, 0.3, 0.125, 0.1, 0.05, 0.025, 0.01, 0.001, 1e-6]:
        n = min_items_for_significance(alpha)
        assert n == math.ceil(math.log2(1 / alpha) - 1e-12)
        # reachable at n (all n items discordant, all against the candidate), not at n - 1
        assert mcnemar_exact(0, n, "less") <= alpha
        assert n == 1 or mcnemar_exact(0, n - 1, "less") > alpha
    for bad in [0.0, 1.0, -0.1, 2]:
        with pytest.raises(ValueError, match="alpha"):
            min_items_for_significance(bad)


# -- paired comparison --------------------------------------------------------------------------

def test_newcombe_published_example():
    # Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables, ch. 8
    # (Cavo et al. 2012): estimate -0.0621, 95% CI -0.1186 to -0.0046
    lo, hi = newcombe_paired_interval(59, 6, 16, 80)
    assert lo == pytest.approx(-0.1186, abs=5e-5)
    assert hi == pytest.approx(-0.0046, abs=5e-5)
    cmp = paired_comparison(*_pairs(59, 6, 16, 80))
    assert cmp.diff == pytest.approx(-10 / 161)
    assert (cmp.low, cmp.high) == (lo, hi)


def _coverage(n: int, probs: tuple[float, float, float, float]) -> float:
    """Exact coverage of the paired interval: the probability, summed over every 2x2 table of
    n items, that the interval holds the true difference."""
    pa, pb, pc, pd = probs
    true = pb - pc
    total = 0.0
    for a in range(n + 1):
        for b in range(n + 1 - a):
            for c in range(n + 1 - a - b):
                d = n - a - b - c
                ways = math.factorial(n) // (math.factorial(a) * math.factorial(b) * math.factorial(c)
                                             * math.factorial(d))
                lo, hi = newcombe_paired_interval(a, b, c, d)
                if lo <= true <= hi:
                    total += ways * pa ** a * pb ** b * pc ** c * pd ** d
    return total


@pytest.mark.parametrize("probs", [(0.5, 0.15, 0.1, 0.25), (0.4, 0.1, 0.1, 0.4), (0.6, 0.2, 0.05, 0.15)])
def test_newcombe_coverage_is_near_nominal_on_small_samples(probs):
    assert 0.93 <= _coverage(24, probs) <= 0.995


def test_paired_comparison_counts_and_fields():
    a, b = _pairs(40, 8, 4, 20)
    rng = random.Random(3)
    order = list(range(len(a)))
    rng.shuffle(order)
    a, b = [a[i] for i in order], [b[i] for i in order]
    assert paired_counts(a, b) == (40, 8, 4, 20)
    cmp = paired_comparison(a, b)
    assert cmp.n == 72
    assert cmp.acc_a == pytest.approx(48 / 72) and cmp.acc_b == pytest.approx(44 / 72)
    assert cmp.diff == pytest.approx(4 / 72)
    assert cmp.low < cmp.diff < cmp.high
    assert cmp.p_value == mcnemar_exact(8, 4)
    assert cmp.p("less") == mcnemar_exact(8, 4, "less")
    # swapping A and B mirrors the interval
    rev = paired_comparison(b, a)
    assert (rev.low, rev.high) == pytest.approx((-cmp.high, -cmp.low), abs=1e-12)
    assert rev.p_value == cmp.p_value
    with pytest.raises(ValueError, match="same items"):
        paired_comparison([True, False], [True])


def test_paired_comparison_edges():
    empty = paired_comparison([], [])
    assert (empty.n, empty.diff, empty.low, empty.high, empty.p_value) == (0, 0.0, -1.0, 1.0, 1.0)
    assert verdict(empty) == "not distinguishable at this size"

    same = [True, False, True, True, False, True] * 5
    equal = paired_comparison(same, same)               # no discordant pair: no evidence
    assert equal.diff == 0.0 and equal.p_value == 1.0
    assert equal.low < 0.0 < equal.high                 # not a zero-width interval
    assert verdict(equal) == "not distinguishable at this size"

    worse = paired_comparison([False] * 5, [True] * 5)  # every item discordant, against A
    assert worse.diff == -1.0 and worse.p_value == 2 / 32
    assert worse.p("less") == 1 / 32
    assert -1.0 <= worse.low < worse.high < 0.0
    assert verdict(worse) == "not distinguishable at this size"          # two-sided 0.0625
    assert verdict(worse, alpha=0.1) == "worse"
    better = paired_comparison([True] * 30, [False] * 30)
    assert verdict(better) == "better" and better.high == 1.0


def test_format_comparison():
    cmp = paired_comparison(*_pairs(40, 8, 4, 20))
    p = 2 * (1 + 12 + 66 + 220 + 495) / 4096
    text = format_comparison(cmp)
    assert text == (f"+0.056 [\u2212{-cmp.low:.2f}, +{cmp.high:.2f}], p = {p:.2f}: "
                    "not distinguishable at this size")
    assert format_comparison(cmp, ascii=True) == text.replace("\u2212", "-")
    assert format_comparison(cmp, verdict_text=False) == text.split(":")[0]
    strong = paired_comparison(*_pairs(10, 0, 25, 5))
    assert format_comparison(strong, ascii=True).endswith("p < 0.001: worse")
    assert format_comparison(strong, ascii=True).startswith("-0.625 [-")
    mid = PairedComparison(both=0, only_a=0, only_b=0, neither=1, level=0.95, low=-0.004, high=0.5,
                           p_value=0.0042)
    assert format_comparison(mid, ascii=True, verdict_text=False) == "+0.000 [+0.00, +0.50], p = 0.004"


# -- per-item evidence --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 15, 16, 17, 63, 200, 1001])
def test_bits_round_trip(n):
    rng = random.Random(n)
    values = [rng.random() < 0.5 for _ in range(n)]
    text = encode_bits(values)
    assert decode_bits(text) == values
    assert text.startswith(f"{n}:")
    np = pytest.importorskip("numpy")
    import base64
    packed = np.packbits(np.array(values, dtype=bool)).tobytes() if n else b""
    assert base64.urlsafe_b64decode(text.split(":", 1)[1]) == packed


def test_bits_are_compact_and_validated():
    assert len(encode_bits([True, False] * 100)) == 40
    assert encode_bits([]) == "0:"
    assert decode_bits(encode_bits([True] * 3)) == [True] * 3
    assert decode_bits(encode_bits([1, 0, 1])) == [True, False, True]       # truthy values
    for bad in ["", "abc", "x:AA==", "3", "9:4A==", "3:!!!!", "3:/w=="]:   # "3:/w==" sets spare bits
        with pytest.raises(ValueError):
            decode_bits(bad)


def test_items_digest():
    ids = ["legal/2019/q01", "legal/2019/q02", "health/2020/q7"]
    d = items_digest(ids)
    assert len(d) == 64 and int(d, 16) >= 0
    assert items_digest(list(ids)) == d and items_digest(tuple(ids)) == d
    assert items_digest(list(reversed(ids))) != d                  # order matters
    assert items_digest(["a,b"]) != items_digest(["a", "b"])      # ids cannot run together
    assert items_digest(['a"', "b"]) != items_digest(["a", '"b'])
    assert items_digest([]) == hashlib.sha256(b"[]").hexdigest()
    with pytest.raises(TypeError):
        items_digest(["a", 3])  # type: ignore[list-item]


def test_module_is_pure_python():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(stats))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"torch", "scipy", "numpy"}


# -- Holm and the intersection-union test ----------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_holm_matches_statsmodels_multipletests(seed):
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    import random

    rng = random.Random(seed)
    ps = [rng.random() ** 3 for _ in range(rng.randint(1, 9))] + [0.02, 0.02]   # ties included
    reject, adjusted, _, _ = multipletests(ps, alpha=0.05, method="holm")
    assert stats.holm_adjust(ps) == pytest.approx(list(adjusted), abs=1e-14)
    assert [p <= 0.05 for p in stats.holm_adjust(ps)] == list(reject)


def test_holm_worked_example_and_errors():
    # m = 4, sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3 (max with 0.02), x2 = 0.06, x1 then max = 0.06
    assert stats.holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm_adjust([]) == []
    with pytest.raises(ValueError, match="not a p-value"):
        stats.holm_adjust([0.1, 1.5])


def test_intersection_union_needs_every_p():
    iu = stats.intersection_union([0.01, 0.049, 0.03])
    assert iu.holds and iu.p_value == 0.049 and "beats all 3 baselines" in iu.text()
    iu = stats.intersection_union([0.01, 0.051])
    assert not iu.holds and iu.p_value == 0.051 and "does not beat all 2" in iu.text()
    assert not stats.intersection_union([]).holds
