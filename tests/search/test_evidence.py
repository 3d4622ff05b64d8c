"""Scores shown with their uncertainty: Wilson intervals per accuracy, paired exact comparisons."""

from __future__ import annotations

import math

import optuna
import pytest

from evals.stats import encode_bits
from search import evidence as E
from search import trials as T
from search.status import status_dict, summary_lines

DIST = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


def _trial(study, x: float, bits: list[bool], **attrs) -> None:
    n, k = len(bits), sum(bits)
    study.add_trial(optuna.trial.create_trial(
        params={"x": x}, distributions=DIST, value=k / n,
        user_attrs={T.A_SCORE: k / n, T.A_DOMAINS: {"legal": {"acc": k / n, "gold_prob": 0.5, "n": n}},
                    T.A_ITEMS: {"legal": encode_bits(bits)}, **attrs}))


@pytest.fixture
def study() -> optuna.Study:
    s = optuna.create_study(direction="maximize", study_name="ev")
    s.set_user_attr(T.S_CAMPAIGN, {"objectives": {"legal": 1.0}, "budget": {"trials": 3}})
    # 18 items: the baseline gets 10 right, the best 12; discordant: 3 only the best, 1 only the baseline
    base = [True] * 9 + [False] * 8 + [True]
    best = [True] * 9 + [True, True, True] + [False] * 5 + [False]
    _trial(s, 0.1, base, **{T.A_BASELINE: "uniform"})
    _trial(s, 0.2, best)
    _trial(s, 0.3, [False] * 18)
    return s


def test_the_best_against_a_baseline_is_paired_and_exact(study):
    d = status_dict(study)
    cmp = d["best_vs_baselines"]["uniform"]
    assert cmp["only_a"] == 3 and cmp["only_b"] == 1 and cmp["n"] == 18
    assert cmp["diff"] == pytest.approx(2 / 18)
    # two-sided exact McNemar: 2 * P(X <= 1), X ~ Binomial(4, 1/2) = 2 * 5/16
    assert cmp["p_value"] == pytest.approx(0.625)
    low, high = cmp["ci95"]
    assert low < 2 / 18 < high and -1 <= low and high <= 1
    assert cmp["verdict"] == "not distinguishable at this size"


def test_each_accuracy_carries_its_wilson_interval(study):
    acc = status_dict(study)["best_domains"]["legal"]
    assert acc["correct"] == 12 and acc["n"] == 18
    # Wilson 95% for 12/18, computed here from its formula
    z, p, n = 1.959963984540054, 12 / 18, 18
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert acc["ci95"] == pytest.approx([centre - half, centre + half])


def test_status_lines_show_intervals_p_values_and_the_selection_note(study):
    text = "\n".join(summary_lines(study))
    assert "0.667 [0.44, 0.84]" in text           # 12/18 with its interval
    assert "vs uniform: +0.111 [" in text and "p = 0.62" in text
    assert "not distinguishable at this size" in text
    assert "optimistic" in text


def test_comparisons_need_the_same_items():
    assert E.compare({"legal": [True, False]}, {"legal": [True]}) is None
    assert E.compare({}, {"legal": [True]}) is None
    cmp = E.compare({"legal": [True] * 6, "health": [True]}, {"legal": [False] * 6, "health": [True]})
    assert cmp.only_a == 6 and cmp.p_value == pytest.approx(2 * 0.5 ** 6)
    assert E.comparison_dict(cmp)["verdict"] == "better"
