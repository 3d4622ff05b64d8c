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


def test_the_best_against_a_baseline_on_dev_is_paired_exact_and_has_no_verdict(study):
    d = status_dict(study)
    cmp = d["best_vs_baselines"]["uniform"]
    assert cmp["n"] == 18 and cmp["discordant"] == 4
    assert cmp["diff"] == pytest.approx(2 / 18)
    # one domain: the sign-flip test is McNemar's exact test, 2 * P(X <= 1), X ~ Binomial(4, 1/2)
    assert cmp["p_value"] == pytest.approx(0.625)
    low, high = cmp["ci95"]
    assert low < 2 / 18 < high
    assert cmp["verdict"] is None and cmp["text"].endswith("selected on these items, no verdict")
    assert d["best_score_ci95"][0] < d["best_score"] < d["best_score_ci95"][1]
    assert d["counts"] == {"trials_searched": 3, "distinct_candidates": 3, "exports": 0, "test_looks": 0}
    assert "3 trials searched" in d["selection_note"]
    import json

    assert json.loads(json.dumps(d))["counts"] == d["counts"]      # `status --json` prints it


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
    assert "selected on these items, no verdict" in text
    for word in ("better", "worse", "beats", "not distinguishable"):
        assert word not in text                     # no verdict from the items that chose the winner
    assert "optimistic" in text and "0 looks at the test split" in text


def test_status_counts_each_twin_group_once(study):
    """The same trials with every item asked twice (answered alike) and the study's twin groups
    stored: status's dev comparison and score intervals are those of one copy."""
    twice = optuna.create_study(direction="maximize", study_name="ev2")
    twice.set_user_attr(T.S_CAMPAIGN, {"objectives": {"legal": 1.0}, "budget": {"trials": 3}})
    for t in study.get_trials():
        bits = [b for b in T.item_bits(t)["legal"] for _ in (0, 1)]
        extra = {T.A_BASELINE: "uniform"} if T.baseline_name(t) else {}
        _trial(twice, t.params["x"], bits, **extra)
    naive = status_dict(twice)
    T.ItemLists(twice).check("final", {"legal": [f"q{i}" for i in range(36)]},
                             {"legal": [f"f{i // 2}" for i in range(36)]})
    once, honest = status_dict(study), status_dict(twice)
    for key in ("p_value", "ci95", "diff"):
        assert honest["best_vs_baselines"]["uniform"][key] == pytest.approx(once["best_vs_baselines"]["uniform"][key])
    assert honest["best_vs_baselines"]["uniform"]["units"] == 18 and naive["best_vs_baselines"]["uniform"]["units"] == 36
    assert naive["best_vs_baselines"]["uniform"]["p_value"] < once["best_vs_baselines"]["uniform"]["p_value"]
    assert honest["best_score_ci95"] == pytest.approx(once["best_score_ci95"])
    assert honest["baseline_scores"]["uniform"]["ci95"] == pytest.approx(once["baseline_scores"]["uniform"]["ci95"])
    lo, hi = once["best_score_ci95"]
    assert f"{once['best_score']:.4f} [{lo:.3f}, {hi:.3f}]" in "\n".join(summary_lines(twice))


def test_comparisons_need_the_same_items():
    assert E.compare({"legal": [True, False]}, {"legal": [True]}) is None
    assert E.compare({}, {"legal": [True]}) is None
    cmp = E.compare({"legal": [True] * 6, "health": [True]}, {"legal": [False] * 6, "health": [True]})
    assert cmp.only_a == 6 and cmp.p_value == pytest.approx(2 * 0.5 ** 6)
    assert E.comparison_dict(cmp)["verdict"] == "better"


# -- held-out verdicts, Holm, intersection-union, the gap, the counts -------------------------------

from search import verdicts as V  # noqa: E402


def _bits(n, right, *, offset=0):
    return [offset <= i < offset + right for i in range(n)]


def test_held_out_verdicts_use_holm_and_an_intersection_union_claim():
    weights = {"legal": 1.0, "health": 1.0}
    merge = {"legal": _bits(60, 50), "health": _bits(60, 50)}
    specialist = {"legal": _bits(60, 30), "health": _bits(60, 35)}
    uniform = {"legal": _bits(60, 46, offset=10), "health": _bits(60, 47, offset=10)}   # close: not significant
    v = V.held_out_verdicts(merge, {"specialist": specialist, "uniform": uniform}, weights)
    from evals.stats import holm_adjust

    raw = [v["baselines"][k]["p_value"] for k in ("specialist", "uniform")]
    assert [v["baselines"][k]["p_holm"] for k in ("specialist", "uniform")] == holm_adjust(raw)
    assert v["baselines"]["specialist"]["verdict"] == "better"
    assert v["baselines"]["uniform"]["verdict"] == "not distinguishable at this size"
    assert not v["beats_all"]["holds"]
    assert v["beats_all"]["p_value"] == max(v["baselines"][k]["p_greater"] for k in ("specialist", "uniform"))
    assert "does not beat all 2 baselines" in v["text"] and "Holm-adjusted" in v["text"]
    assert "held-out test items" in v["text"]

    v = V.held_out_verdicts(merge, {"specialist": specialist}, weights)
    assert v["beats_all"]["holds"] and "beats all 1 baselines (intersection-union" in v["text"]
    assert v["score"]["ci95"][0] < v["score"]["score"] < v["score"]["ci95"][1]


def test_items_of_one_twin_group_count_once():
    """Each item asked twice (both wordings answered alike): without groups the verdict counts
    240 items; with them, 120 units, and exactly the p-values and interval of one copy."""
    weights = {"legal": 1.0, "health": 1.0}
    merge = {"legal": _bits(60, 42), "health": _bits(60, 40)}
    specialist = {"legal": _bits(60, 33, offset=7), "health": _bits(60, 31, offset=7)}
    twice = lambda v: {d: [x for x in xs for _ in (0, 1)] for d, xs in v.items()}  # noqa: E731
    groups = {d: [f"{d}-{i}" for i in range(60) for _ in (0, 1)] for d in weights}
    once = V.held_out_verdicts(merge, {"s": specialist}, weights)
    naive = V.held_out_verdicts(twice(merge), {"s": twice(specialist)}, weights)
    honest = V.held_out_verdicts(twice(merge), {"s": twice(specialist)}, weights, clusters=groups)
    assert naive["baselines"]["s"]["p_value"] < once["baselines"]["s"]["p_value"]
    assert honest["baselines"]["s"]["p_value"] == pytest.approx(once["baselines"]["s"]["p_value"], abs=1e-12)
    assert honest["score"]["ci95"] == pytest.approx(once["score"]["ci95"], abs=1e-12)
    assert (honest["n_items"], honest["n_units"], naive["n_units"]) == (240, 120, 240)
    assert "120 independent units" in honest["text"] and "independent units" not in naive["text"]
    # groups that do not label these items are not used (item-level, said so by n_units)
    assert V.held_out_verdicts(twice(merge), {"s": twice(specialist)}, weights,
                               clusters={"legal": ["x"]})["n_units"] == 240


def test_unpaired_baselines_are_left_out_and_named():
    v = V.held_out_verdicts({"legal": [True] * 5}, {"b": {"legal": [True] * 4}}, None)
    assert v["unpaired"] == ["b"] and not v["beats_all"]["holds"] and v["beats_all"]["n"] == 0


def test_generalization_gap_against_the_baselines_mean_gap():
    merge = ({"legal": _bits(50, 45)}, {"legal": _bits(50, 30)})     # 0.90 on dev, 0.60 on test
    base_a = ({"legal": _bits(50, 30)}, {"legal": _bits(50, 29)})    # -0.02
    base_b = ({"legal": _bits(50, 25)}, {"legal": _bits(50, 26)})    # +0.02
    g = V.generalization_gap(merge, {"a": base_a, "b": base_b}, {"legal": 1.0})
    assert g["merge_gap"] == pytest.approx(-0.30)
    assert g["baselines_mean_gap"] == pytest.approx(0.0)
    assert g["excess_gap"] == pytest.approx(-0.30)
    assert g["ci95"][0] < -0.30 < g["ci95"][1] < 0
    assert V.generalization_gap(merge, {}, None) is None


def test_dev_comparisons_and_the_gap_count_each_twin_group_once():
    """Every dev and test item asked twice (answered alike): with the twin groups, the dev
    comparison and the gap's interval are the single copy's; without them they are narrower."""
    twice = lambda v: {d: [x for x in xs for _ in (0, 1)] for d, xs in v.items()}  # noqa: E731
    groups = {"legal": [f"f{i}" for i in range(50) for _ in (0, 1)]}
    merge = ({"legal": _bits(50, 45)}, {"legal": _bits(50, 30)})
    base = ({"legal": _bits(50, 30, offset=3)}, {"legal": _bits(50, 29, offset=3)})
    dup = lambda pair: (twice(pair[0]), twice(pair[1]))  # noqa: E731
    once = V.dev_comparisons(merge[0], {"b": base[0]}, None)["b"]
    honest = V.dev_comparisons(twice(merge[0]), {"b": twice(base[0])}, None, clusters=groups)["b"]
    naive = V.dev_comparisons(twice(merge[0]), {"b": twice(base[0])}, None)["b"]
    assert honest["p_value"] == pytest.approx(once["p_value"], abs=1e-12) and naive["p_value"] < once["p_value"]
    assert honest["ci95"] == pytest.approx(once["ci95"], abs=1e-12)
    g_once = V.generalization_gap(merge, {"b": base}, None)
    g_honest = V.generalization_gap(dup(merge), {"b": dup(base)}, None, clusters=(groups, groups))
    g_naive = V.generalization_gap(dup(merge), {"b": dup(base)}, None)
    assert g_honest["excess_gap"] == pytest.approx(g_once["excess_gap"])
    assert g_honest["ci95"] == pytest.approx(g_once["ci95"], abs=1e-12)
    assert g_naive["ci95"][1] - g_naive["ci95"][0] < 0.85 * (g_once["ci95"][1] - g_once["ci95"][0])


def test_counts_read_the_exports(study, tmp_path):
    import json

    (tmp_path / "exports.json").write_text(json.dumps([{"trial": 1, "rows": [{"test": 0.5}]},
                                                       {"trial": 1, "rows": [{"test": 0.5}]}]))
    c = V.search_counts(study, tmp_path)
    assert c == {"trials_searched": 3, "distinct_candidates": 3, "exports": 2, "test_looks": 2}
    assert "2 exports, 2 looks at the test split" in E.selection_note(3, c)


def test_an_interval_clear_of_zero_with_a_holm_p_above_alpha_is_no_verdict_and_says_why():
    """The interval beside a held-out verdict is that comparison's own 95%; Holm adjusts the p
    over the baselines. Here the merge is ahead of one baseline with p 0.039 and an interval
    clear of 0: "better" alone, but against three such baselines the adjusted p is 0.116, so no
    verdict, and every place that shows both says where they can differ."""
    weights = {"legal": 1.0}
    merge = {"legal": _bits(100, 58)}
    rival = {"legal": _bits(100, 50, offset=10)}
    alone = V.held_out_verdicts(merge, {"a": rival}, weights)["baselines"]["a"]
    assert alone["p_value"] < 0.05 and alone["ci95"][0] > 0 and alone["verdict"] == "better"
    v = V.held_out_verdicts(merge, {"a": rival, "b": rival, "c": rival}, weights)
    row = v["baselines"]["a"]
    assert row["ci95"] == alone["ci95"] and row["ci95"][0] > 0
    assert row["p_holm"] == pytest.approx(3 * alone["p_value"]) and row["p_holm"] > 0.05
    assert row["verdict"] == "not distinguishable at this size"
    assert V.INTERVAL_NOTE in v["text"]
    claims = {"verdicts": v, "dev": {}, "counts": {"trials_searched": 1, "distinct_candidates": 1,
                                                   "exports": 1, "test_looks": 1}}
    assert V.INTERVAL_NOTE in V.claims_markdown(claims)
    from search.demo.table import verdict_lines

    demo = {"best_beats_specialists_and_uniform_on_test": False, "best_is_searched": True,
            "test_items": 100, "test_units": 100, "beats_all": v["beats_all"],
            "test": {"a": row}, "dev_selected_on": {}}
    assert any(V.INTERVAL_NOTE in line for line in verdict_lines(demo))
