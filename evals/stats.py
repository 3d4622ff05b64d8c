"""Small exact statistics for scores on a few hundred exam items, and compact per-item evidence.

Pure Python (``math``, ``statistics``, ``base64``, ``hashlib``): no torch, no scipy.

- :func:`wilson_interval` — an interval for one accuracy ``k / n``.
- :func:`paired_comparison` — two models scored on the *same* items: the difference in
  accuracy, Newcombe's interval for a paired difference, and McNemar's exact test.
- :func:`mcnemar_exact` — the exact test on the discordant pairs alone, two-sided or one-sided
  (the one-sided ``"less"`` form asks "is A worse than B?", as a pruning rule does).
- :func:`format_comparison` — ``+0.056 [−0.06, +0.17], p = 0.38: not distinguishable at this size``.
- :func:`min_items_for_significance` — the fewest items on which the test can reach ``alpha``.
- :func:`encode_bits` / :func:`decode_bits` — per-item correctness as a short string;
  :func:`items_digest` — a digest of an ordered item-id list, stored once and checked on resume.

Why these methods: on tens to hundreds of items the normal approximation (Wald) misbehaves —
its interval for 18/18 is [1, 1] and it can leave [0, 1]; McNemar's chi-square needs ~10+
discordant pairs to be trusted. The Wilson score interval and the exact binomial test have no
such failure and cost nothing to compute.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

Alternative = Literal["two-sided", "less", "greater"]
ALTERNATIVES = ("two-sided", "less", "greater")
DEFAULT_LEVEL = 0.95   # the confidence level of every interval unless told otherwise
DEFAULT_ALPHA = 0.05   # the significance level of verdicts unless told otherwise
MINUS = "\u2212"       # typographic minus, as in "−0.06"


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r}: a confidence level lies strictly between 0 and 1, e.g. 0.95")
    return NormalDist().inv_cdf(0.5 + level / 2)


# -- one accuracy -------------------------------------------------------------------------------

def wilson_interval(k: int, n: int, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The Wilson score interval for a proportion ``k / n`` (no continuity correction).

    It is the set of true accuracies p for which the observed ``k`` is within ``z`` standard
    errors computed at p itself, so it stays inside [0, 1] and is not degenerate at 0/n or n/n.
    ``n == 0`` says nothing: ``(0.0, 1.0)``.
    """
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"wilson_interval(k={k}, n={n}): need 0 <= k <= n")
    z = _z(level)
    if n == 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at k == 0 (k == n) the exact bound is 0 (1); rounding must not put it a hair beyond
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return low, high


def format_accuracy(k: int, n: int, *, level: float = DEFAULT_LEVEL) -> str:
    """``0.611 [0.39, 0.80] (11/18)``: an accuracy with its Wilson interval and counts."""
    if n == 0:
        return "no items"
    low, high = wilson_interval(k, n, level)
    return f"{k / n:.3f} [{low:.2f}, {high:.2f}] ({k}/{n})"


# -- McNemar's exact test -----------------------------------------------------------------------

def _binom_half_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), computed exactly in integers then divided once."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)


def mcnemar_exact(b: int, c: int, alternative: Alternative = "two-sided") -> float:
    """The p-value of McNemar's exact test from the discordant pairs.

    ``b``: items A got right and B wrong; ``c``: items A got wrong and B right. Under the null
    hypothesis (A and B equally accurate on these items) each discordant item is a fair coin,
    so ``b ~ Binomial(b + c, 1/2)`` and the concordant items carry no information.

    - ``"two-sided"``: A and B differ; ``min(1, 2 · P(X <= min(b, c)))`` (the binomial
      distribution at 1/2 is symmetric, so this equals scipy's ``binomtest`` two-sided p).
    - ``"less"``: A is worse than B (few ``b``): ``P(X <= b)``.
    - ``"greater"``: A is better than B: ``P(X >= b)``.

    No discordant pairs (``b == c == 0``): no evidence either way, p = 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact(b={b}, c={c}): counts of items cannot be negative")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r}: choose one of {', '.join(ALTERNATIVES)}")
    n = b + c
    if n == 0:
        return 1.0
    if alternative == "less":
        return _binom_half_cdf(b, n)
    if alternative == "greater":
        return _binom_half_cdf(c, n)      # P(X >= b) = P(n - X <= n - b) = P(Y <= c)
    return min(1.0, 2 * _binom_half_cdf(min(b, c), n))


def min_items_for_significance(alpha: float = DEFAULT_ALPHA, *,
                               alternative: Alternative = "less") -> int:
    """The fewest items on which McNemar's exact test can reach ``p <= alpha`` at all.

    The smallest p a one-sided test can give on ``n`` items comes when every item is
    discordant and against the candidate: ``p = 0.5 ** n``. So ``n >= ceil(log2(1 / alpha))``:
    5 items at alpha = 0.05 (p = 0.031), 7 at 0.01. Two-sided, the smallest p is
    ``2 · 0.5 ** n``: one item more. A stage-1 subset smaller than this can never prune a
    candidate on evidence, whatever its answers; in practice most pairs are concordant, so
    a useful stage 1 is several times larger.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha!r}: a significance level lies strictly between 0 and 1, e.g. 0.05")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r}: choose one of {', '.join(ALTERNATIVES)}")
    n = 1
    while _smallest_p(n, alternative) > alpha:
        n += 1
    return n


def _smallest_p(n: int, alternative: Alternative) -> float:
    """The smallest p the test can give on ``n`` items: every one discordant, all one way."""
    return mcnemar_exact(n, 0, alternative) if alternative == "greater" else mcnemar_exact(0, n, alternative)


# -- paired comparison --------------------------------------------------------------------------

@dataclass(frozen=True)
class PairedComparison:
    """Two models on the same ``n`` items; every field is derived from the four cell counts."""

    both: int        # items both got right
    only_a: int      # A right, B wrong (McNemar's b)
    only_b: int      # A wrong, B right (McNemar's c)
    neither: int     # both wrong
    level: float
    low: float       # interval for acc_a - acc_b
    high: float
    p_value: float   # McNemar exact, two-sided

    @property
    def n(self) -> int:
        return self.both + self.only_a + self.only_b + self.neither

    @property
    def acc_a(self) -> float:
        return (self.both + self.only_a) / self.n if self.n else math.nan

    @property
    def acc_b(self) -> float:
        return (self.both + self.only_b) / self.n if self.n else math.nan

    @property
    def diff(self) -> float:
        """acc_a - acc_b (0.0 on no items)."""
        return (self.only_a - self.only_b) / self.n if self.n else 0.0

    def p(self, alternative: Alternative = "two-sided") -> float:
        return mcnemar_exact(self.only_a, self.only_b, alternative)


def paired_counts(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, int, int]:
    """(both right, only A right, only B right, both wrong) over items scored by both."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison of {len(a)} and {len(b)} items: both models must be scored "
                         "on the same items, in the same order")
    both = only_a = only_b = neither = 0
    for x, y in zip(a, b):
        x, y = bool(x), bool(y)
        if x and y:
            both += 1
        elif x:
            only_a += 1
        elif y:
            only_b += 1
        else:
            neither += 1
    return both, only_a, only_b, neither


def newcombe_paired_interval(both: int, only_a: int, only_b: int, neither: int,
                             level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Newcombe's interval for a difference of paired proportions (method 10 of Newcombe 1998,
    "Improved confidence intervals for the difference between binomial proportions based on
    paired data", Stat. Med. 17:2635): Wilson intervals without continuity correction, phi with
    Newcombe's adjustment. It reproduces the published example of Fagerland, Lydersen & Laake
    (*Statistical Analysis of Contingency Tables*, ch. 8: 59/6/16/80 -> [-0.1186, -0.0046]).

    Why this one: it combines the Wilson intervals of the two accuracies, corrected for their
    correlation across items (phi of the 2x2 table), so it inherits Wilson's behaviour on small
    samples — it stays inside [-1, 1] and is not of zero width when no pair is discordant —
    and its coverage is close to nominal at the sizes a stage 1 uses, where the Wald interval
    (b - c)/n ± z·sqrt(...) collapses to a point at b = c = 0 and undercovers. It is a
    closed form (no iteration), so it is exact to compute and cheap.
    """
    n = both + only_a + only_b + neither
    if n == 0:
        return -1.0, 1.0
    a_right, b_right = both + only_a, both + only_b
    p1, p2 = a_right / n, b_right / n
    l1, u1 = wilson_interval(a_right, n, level)
    l2, u2 = wilson_interval(b_right, n, level)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    # phi, the correlation of the two models' correctness across items, as Newcombe defines it
    # for this method: a positive association counts only beyond n/2 (AD - BC - n/2), so that a
    # small chance correlation does not narrow the interval
    cross = both * neither - only_a * only_b
    if cross > n / 2:
        cross -= n / 2
    elif cross > 0:
        cross = 0
    phi = cross / math.sqrt(margins) if margins else 0.0
    theta = p1 - p2
    dl = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    du = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, theta - dl), min(1.0, theta + du)


def paired_comparison(a: Sequence[bool], b: Sequence[bool], *,
                      level: float = DEFAULT_LEVEL) -> PairedComparison:
    """Compare model A with model B on the same items: ``a[i]`` / ``b[i]`` say whether A / B
    answered item ``i`` correctly. The interval is Newcombe's (see
    :func:`newcombe_paired_interval`), the p-value McNemar's exact two-sided one."""
    both, only_a, only_b, neither = paired_counts(a, b)
    low, high = newcombe_paired_interval(both, only_a, only_b, neither, level)
    return PairedComparison(both=both, only_a=only_a, only_b=only_b, neither=neither, level=level,
                            low=low, high=high, p_value=mcnemar_exact(only_a, only_b))


def verdict(cmp: PairedComparison, *, alpha: float = DEFAULT_ALPHA) -> str:
    """"better" / "worse" (A against B, two-sided exact test at ``alpha``), or
    "not distinguishable at this size"."""
    if cmp.n and cmp.p_value <= alpha:
        return "better" if cmp.only_a > cmp.only_b else "worse"
    return "not distinguishable at this size"


def _signed(x: float, digits: int, minus: str) -> str:
    text = f"{x:+.{digits}f}"
    if float(text) == 0.0:           # no "-0.00"
        text = f"{0.0:+.{digits}f}"
    return text.replace("-", minus)


def _p_text(p: float) -> str:
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def format_comparison(cmp: PairedComparison, *, alpha: float = DEFAULT_ALPHA, verdict_text: bool = True,
                      ascii: bool = False) -> str:
    """``+0.056 [−0.06, +0.17], p = 0.38: not distinguishable at this size`` — A minus B, its
    interval, McNemar's exact two-sided p, and the verdict at ``alpha``. ``ascii`` writes
    ``-`` for the minus sign."""
    minus = "-" if ascii else MINUS
    text = (f"{_signed(cmp.diff, 3, minus)} [{_signed(cmp.low, 2, minus)}, {_signed(cmp.high, 2, minus)}], "
            f"{_p_text(cmp.p_value)}")
    return f"{text}: {verdict(cmp, alpha=alpha)}" if verdict_text else text


# -- compact per-item evidence ------------------------------------------------------------------

def encode_bits(values: Sequence[bool]) -> str:
    """``"<n>:<base64url>"``: item i is bit ``7 - i % 8`` of byte ``i // 8`` (``numpy.packbits``
    order), unused bits zero. 200 items take 40 characters."""
    n = len(values)
    data = bytearray((n + 7) // 8)
    for i, v in enumerate(values):
        if v:
            data[i >> 3] |= 0x80 >> (i & 7)
    return f"{n}:{base64.urlsafe_b64encode(bytes(data)).decode('ascii')}"


def decode_bits(text: str) -> list[bool]:
    """The list :func:`encode_bits` encoded; a malformed or inconsistent string raises ValueError."""
    head, sep, body = text.partition(":")
    if not sep or not head.isdigit():
        raise ValueError(f"{text[:40]!r} is not per-item evidence: expected '<count>:<base64>'")
    n = int(head)
    try:
        data = base64.urlsafe_b64decode(body.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"{text[:40]!r}: the bits are not valid base64 ({exc})") from None
    if len(data) != (n + 7) // 8:
        raise ValueError(f"{text[:40]!r}: {len(data)} bytes for {n} items (expected {(n + 7) // 8})")
    spare = 8 * len(data) - n
    if spare and data[-1] & ((1 << spare) - 1):
        raise ValueError(f"{text[:40]!r}: bits set beyond item {n}: the string is corrupt")
    return [bool(data[i >> 3] & (0x80 >> (i & 7))) for i in range(n)]


def items_digest(item_ids: Sequence[str]) -> str:
    """sha256 (hex) of an ordered list of item ids; the order matters, as it does for
    :func:`encode_bits`. The ids are hashed as a JSON array, so no id can run into the next."""
    ids = list(item_ids)
    bad = [x for x in ids if not isinstance(x, str)]
    if bad:
        raise TypeError(f"item ids are strings; got {type(bad[0]).__name__} {bad[0]!r}")
    payload = json.dumps(ids, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(payload).hexdigest()


# -- several comparisons at once ------------------------------------------------------------------

def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (Holm 1979, "A simple sequentially
    rejective multiple test procedure", Scand. J. Statist. 6:65). Sorted ascending,
    ``adj_(i) = max_{j <= i} min(1, (m - j + 1) · p_(j))``; rejecting where ``adj <= alpha``
    controls the family-wise error rate at ``alpha`` under any dependence, and is never less
    powerful than Bonferroni."""
    ps = [float(p) for p in p_values]
    bad = [p for p in ps if not 0.0 <= p <= 1.0 or math.isnan(p)]
    if bad:
        raise ValueError(f"holm_adjust: {bad[0]!r} is not a p-value in [0, 1]")
    m = len(ps)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: ps[k])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


@dataclass(frozen=True)
class IntersectionUnion:
    """"A beats every one of B_1..B_k": an intersection-union test. The joint claim holds at
    level ``alpha`` when *each* one-sided p is ``<= alpha`` (Berger 1982); no multiplicity
    correction is needed, since all must reject. Its p-value is the largest of the p-values."""

    p_value: float
    alpha: float
    holds: bool
    n: int

    def text(self) -> str:
        if not self.n:
            return "no baselines to compare with"
        if self.holds:
            return (f"beats all {self.n} baselines (intersection-union test: each one-sided p <= {self.alpha}; "
                    f"largest p = {self.p_value:.3g})")
        return (f"does not beat all {self.n} baselines at {self.alpha} (intersection-union test: "
                f"largest one-sided p = {self.p_value:.3g})")


def intersection_union(p_values: Sequence[float], *, alpha: float = DEFAULT_ALPHA) -> IntersectionUnion:
    """The intersection-union test of the one-sided ``p_values`` (see :class:`IntersectionUnion`);
    with no p-values there is no claim (``holds`` False)."""
    ps = [float(p) for p in p_values]
    p = max(ps) if ps else 1.0
    return IntersectionUnion(p_value=p, alpha=alpha, holds=bool(ps) and p <= alpha, n=len(ps))
