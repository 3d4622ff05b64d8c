"""Result types of an evaluation: per-task metrics, per-item outcomes, JSON form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ItemResult:
    task: str
    id: str
    pred: str          # predicted label, or "[invalid]" (generation found no letter)
    gold: str
    correct: bool
    gold_prob: float | None = None  # gold letter's probability, normalized over the letters


@dataclass(frozen=True)
class TaskMetrics:
    domain: str
    acc: float
    n: int
    chance: float
    gold_prob: float | None = None  # mean over items; None for generation


@dataclass
class EvalResult:
    tasks: dict[str, TaskMetrics]
    items: list[ItemResult]
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def metrics(self) -> dict[str, dict[str, float]]:
        """``{task: {"acc", "gold_prob", "n"}}``, the evaluator seam of DESIGN.md."""
        out: dict[str, dict[str, float]] = {}
        for name, m in self.tasks.items():
            out[name] = {"acc": m.acc, "n": m.n}
            if m.gold_prob is not None:
                out[name]["gold_prob"] = m.gold_prob
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": {name: {k: v for k, v in asdict(m).items() if v is not None}
                      for name, m in self.tasks.items()},
            "items": [{k: v for k, v in asdict(i).items() if v is not None} for i in self.items],
            "skipped": self.skipped,
            "meta": self.meta,
        }


def summarize(task: str, domain: str, chance: float, items: list[ItemResult],
              *, smooth: bool) -> TaskMetrics:
    n = len(items)
    acc = sum(i.correct for i in items) / n if n else 0.0
    gold_prob = (sum(i.gold_prob or 0.0 for i in items) / n if n else 0.0) if smooth else None
    return TaskMetrics(domain=domain, acc=acc, n=n, chance=chance, gold_prob=gold_prob)
