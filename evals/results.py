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
    output: str | None = None  # generated text, cut at the stop string (generation only)


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
        """The ``--json`` form; each task carries the dataset indices it scored (``indices``:
        positions in the lm-eval task's item list, what ``lm_eval --samples`` takes)."""
        indices = self.meta.get("indices", {})
        overlap = self.meta.get("dev_overlap", {})
        meta = {k: v for k, v in self.meta.items() if k not in ("indices", "dev_overlap")}
        tasks = {}
        for name, m in self.tasks.items():
            entry = {k: v for k, v in asdict(m).items() if v is not None}
            if name in overlap:
                entry["dev_overlap"] = overlap[name]
            entry["indices"] = list(indices.get(name, []))
            tasks[name] = entry
        return {
            "tasks": tasks,
            "items": [{k: v for k, v in asdict(i).items() if v is not None} for i in self.items],
            "skipped": self.skipped,
            "meta": meta,
        }


def summarize(task: str, domain: str, chance: float, items: list[ItemResult],
              *, smooth: bool) -> TaskMetrics:
    n = len(items)
    acc = sum(i.correct for i in items) / n if n else 0.0
    gold_prob = (sum(i.gold_prob or 0.0 for i in items) / n if n else 0.0) if smooth else None
    return TaskMetrics(domain=domain, acc=acc, n=n, chance=chance, gold_prob=gold_prob)


def suite_meta(suite: Any) -> dict[str, Any]:
    """What a result must carry about its suite: per task, the dataset indices scored, and
    (leaderboard suite) how many scored items are also in the dev split."""
    meta: dict[str, Any] = {"indices": {t.name: list(t.indices) for t in suite.tasks}}
    overlap = {t.name: t.dev_overlap for t in suite.tasks if t.dev_overlap}
    if overlap:
        meta["dev_overlap"] = overlap
    return meta
