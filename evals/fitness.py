"""From per-task metrics to what a search optimizes: one weighted score or a vector.

A domain's score is accuracy with the smooth metric (``gold_prob``, the mean probability of
the gold letter among the letters) blended in with a small weight: on a few hundred items
accuracy moves in coarse steps and many candidates tie; ``gold_prob`` ranks them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from benchmarks_ptbr.sources import DOMAINS
from evals.results import EvalResult, TaskMetrics
from merge_core.errors import BrmergeError


class FitnessError(BrmergeError):
    """Weights or domains do not fit the result; the message names them and the fix."""


# Weight of gold_prob in a domain score; accuracy keeps 1 - TIE_BREAK_WEIGHT. Small, so a
# gain of one item in ~100 outweighs a 0.1 change in gold_prob: a tie-break, not a target.
TIE_BREAK_WEIGHT = 0.1

# Domain weights of the scalar fitness: every domain of the suite counts 1, except
# HealthBench-BR, a secondary health task (binary, likely LLM-written statements): it counts half.
SECONDARY_WEIGHTS: dict[str, float] = {"healthbench": 0.5}
DEFAULT_WEIGHTS: dict[str, float] = {d: SECONDARY_WEIGHTS.get(d, 1.0) for d in DOMAINS}


def domain_score(metrics: TaskMetrics, *, tie_break: float = TIE_BREAK_WEIGHT) -> float:
    """``(1 - tie_break) * acc + tie_break * gold_prob`` (plain accuracy for generation)."""
    if not 0.0 <= tie_break <= 1.0:
        raise FitnessError(f"tie_break={tie_break} must be between 0 and 1")
    if metrics.gold_prob is None:
        return metrics.acc
    return (1.0 - tie_break) * metrics.acc + tie_break * metrics.gold_prob


def _by_domain(result: EvalResult | Mapping[str, TaskMetrics]) -> dict[str, TaskMetrics]:
    tasks = result.tasks if isinstance(result, EvalResult) else result
    out: dict[str, TaskMetrics] = {}
    for name, metrics in tasks.items():
        if metrics.domain in out:
            raise FitnessError(f"two tasks of domain {metrics.domain!r} (one is {name!r}); "
                             "score one split per result")
        out[metrics.domain] = metrics
    return out


def weighted_score(result: EvalResult | Mapping[str, TaskMetrics], *,
                   weights: Mapping[str, float] | None = None,
                   tie_break: float = TIE_BREAK_WEIGHT) -> float:
    """Weighted mean of the domain scores present in ``result`` (higher is better)."""
    weights = DEFAULT_WEIGHTS if weights is None else weights
    domains = _by_domain(result)
    unknown = [d for d in weights if weights[d] < 0]
    if unknown:
        raise FitnessError(f"negative weight for {', '.join(unknown)}; weights must be >= 0")
    missing = [d for d in domains if d not in weights]
    if missing:
        raise FitnessError(f"no weight for domain(s) {', '.join(missing)}; "
                         f"add them to weights (have {', '.join(weights)})")
    total = sum(weights[d] for d in domains)
    if total <= 0:
        raise FitnessError("the weights of the scored domains sum to 0; give one a positive weight")
    return sum(weights[d] * domain_score(m, tie_break=tie_break)
               for d, m in domains.items()) / total


def objective_vector(result: EvalResult | Mapping[str, TaskMetrics], *,
                     domains: Sequence[str] | None = None,
                     tie_break: float = TIE_BREAK_WEIGHT) -> tuple[float, ...]:
    """One score per domain, in ``domains`` order (default: the result's order), all maximized."""
    by_domain = _by_domain(result)
    order = list(domains) if domains is not None else list(by_domain)
    missing = [d for d in order if d not in by_domain]
    if missing:
        raise FitnessError(f"domain(s) {', '.join(missing)} not in the result "
                         f"(have {', '.join(by_domain)})")
    return tuple(domain_score(by_domain[d], tie_break=tie_break) for d in order)
