from __future__ import annotations

import pytest

from evals.fitness import (
    TIE_BREAK_WEIGHT,
    FitnessError,
    domain_score,
    objective_vector,
    weighted_score,
)
from evals.results import EvalResult, TaskMetrics


def _result(**accs) -> EvalResult:
    return EvalResult(tasks={f"ptbr_{d}_dev": TaskMetrics(domain=d, acc=a, n=10, chance=0.25,
                                                         gold_prob=g)
                             for d, (a, g) in accs.items()}, items=[])


def test_domain_score_blends_a_small_tie_break():
    m = TaskMetrics(domain="legal", acc=0.5, n=10, chance=0.25, gold_prob=0.3)
    assert domain_score(m) == pytest.approx((1 - TIE_BREAK_WEIGHT) * 0.5 + TIE_BREAK_WEIGHT * 0.3)
    # equal accuracy: the smooth metric decides; one more correct item beats a better gold_prob
    better_prob = TaskMetrics(domain="legal", acc=0.5, n=10, chance=0.25, gold_prob=0.4)
    one_more = TaskMetrics(domain="legal", acc=0.6, n=10, chance=0.25, gold_prob=0.2)
    assert domain_score(better_prob) > domain_score(m)
    assert domain_score(one_more) > domain_score(better_prob)
    gen = TaskMetrics(domain="legal", acc=0.7, n=10, chance=0.25)
    assert domain_score(gen) == 0.7


def test_weighted_score_and_vector():
    r = _result(legal=(0.5, 0.5), health=(1.0, 1.0), healthbench=(0.0, 0.0))
    assert weighted_score(r) == pytest.approx((0.5 + 1.0 + 0.0) / 2.5)
    assert weighted_score(r, weights={"legal": 1, "health": 0, "healthbench": 0}) \
        == pytest.approx(0.5)
    assert objective_vector(r, domains=["health", "legal"]) == pytest.approx((1.0, 0.5))
    with pytest.raises(FitnessError, match="no weight for domain\\(s\\) healthbench"):
        weighted_score(r, weights={"legal": 1, "health": 1})
    with pytest.raises(FitnessError, match="enem not in the result"):
        objective_vector(r, domains=["enem"])
