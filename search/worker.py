"""The trial worker: one per GPU (or CPU slot), holding for the whole campaign the
resident base and sources, one live model, and its evaluators.

A trial only re-materializes weights in place and evaluates. Staged evaluation: stage 1
scores a small subset; the driver decides whether to prune; stage 2 scores the full dev
limit on the weights already in place.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from collections.abc import Mapping
from typing import Any

from search.campaign import Campaign


def _device_for(campaign: Campaign) -> str:
    import torch

    return "cuda" if torch.cuda.is_available() and campaign.gpus_per_worker > 0 else "cpu"


class TrialWorker:
    """Plain class; the driver wraps it with ``ray.remote`` (resources decided there)."""

    def __init__(self, campaign: Campaign, worker_id: int, *, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)    # the merge kernels take torch's count too
        from transformers import AutoTokenizer

        from evals.harness import Evaluator
        from merge_core.resident import ResidentModels

        start = time.perf_counter()
        self.campaign = campaign
        self.worker_id = worker_id
        self.device = _device_for(campaign)
        self.resident = ResidentModels(campaign.base_model, list(campaign.models), device=self.device)
        self.model = self.resident.load_module()
        tok_dir = str(self.resident.sources[campaign.base_model].path)
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        source = "sample" if campaign.suite == "sample" else "data"
        split = "test" if campaign.suite == "test" else "dev"
        domains = [d for d, w in campaign.objectives.items() if w > 0] if not campaign.multi_objective \
            else list(campaign.objectives)
        common = dict(split=split, source=source, data_dir=campaign.data_dir, domains=domains,
                      num_fewshot=campaign.num_fewshot, purpose="search", allow_test=campaign.allow_test)
        self.full = Evaluator.for_suite(self.tokenizer, limit=campaign.limit, **common)
        self.stage1 = (Evaluator.for_suite(self.tokenizer, limit=campaign.stage1, **common)
                       if campaign.stage1 and not campaign.multi_objective else None)
        self.load_seconds = time.perf_counter() - start
        self._loaded_digest: str | None = None

    def info(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "device": self.device, "host": socket.gethostname(),
                "pid": os.getpid(), "load_seconds": self.load_seconds}

    def run(self, recipe_yaml: str, *, stage: int) -> dict[str, Any]:
        """Materialize (stage 1, or a single-stage trial) and evaluate; never raises."""
        from evals.fitness import objective_vector, weighted_score
        from merge_core.recipe import Recipe

        out: dict[str, Any] = {"worker": self.worker_id, "stage": stage, "pid": os.getpid()}
        try:
            recipe = Recipe.from_yaml(recipe_yaml)
            t0 = time.perf_counter()
            if stage == 1 or self._loaded_digest != recipe.digest():
                bad = self.resident.materialize(recipe, self.model)
                self._loaded_digest = recipe.digest()
                if bad:
                    self._loaded_digest = None
                    out["error"] = f"candidate has {bad} non-finite weights (NaN/inf)"
                    out["materialize_seconds"] = time.perf_counter() - t0
                    return out
            t1 = time.perf_counter()
            evaluator = self.stage1 if (stage == 1 and self.stage1 is not None) else self.full
            result = evaluator.evaluate(self.model)
            t2 = time.perf_counter()
            weights = _positive(self.campaign.objectives)
            out.update({
                "materialize_seconds": t1 - t0,
                "eval_seconds": t2 - t1,
                "final": evaluator is self.full,
                "domains": {m.domain: {"acc": m.acc, "gold_prob": m.gold_prob, "n": m.n}
                            for m in result.tasks.values()},
                "score": weighted_score(result, weights=weights),
                "objectives": list(objective_vector(result, domains=list(self.campaign.objectives))),
            })
        except Exception as exc:  # the driver records it as a FAIL trial and goes on
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["traceback"] = traceback.format_exc(limit=5)
        return out


def _positive(weights: Mapping[str, float]) -> dict[str, float]:
    return {d: w for d, w in weights.items() if w > 0}
