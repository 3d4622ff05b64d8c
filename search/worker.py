"""The trial worker: one per GPU (or CPU slot), holding for the whole campaign the
resident base and sources, one live model, and its evaluators.

A trial only re-materializes weights in place and evaluates. Staged evaluation: stage 1
scores a small subset; the scheduler decides whether to prune; stage 2 scores the full dev
limit on the weights already in place. ``run`` never raises: a failure comes back as a
``StageResult`` with the error and its traceback, which the study records.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any

from search import scoring
from search.campaign import Campaign
from search.stage import StageResult


class TrialWorker:
    """Plain class; the executor wraps it with ``ray.remote`` (resources decided there)."""

    def __init__(self, campaign: Campaign, worker_id: int, *, threads: int | None = None):
        import torch

        if threads:
            torch.set_num_threads(threads)    # the merge kernels take torch's count too
        from transformers import AutoTokenizer

        from merge_core.devices import resolve_device
        from merge_core.resident import ResidentModels

        start = time.perf_counter()
        self.campaign = campaign
        self.worker_id = worker_id
        self.device = str(resolve_device("auto" if campaign.gpus_per_worker > 0 else "cpu"))
        self.resident = ResidentModels(campaign.base_model, list(campaign.models), device=self.device)
        self.model = self.resident.load_module()
        tok_dir = str(self.resident.sources[campaign.base_model].path)
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.full, self.stage1 = scoring.stage_evaluators(campaign, self.tokenizer)
        self.load_seconds = time.perf_counter() - start
        self._loaded_digest: str | None = None

    def info(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "device": self.device, "host": socket.gethostname(),
                "pid": os.getpid(), "load_seconds": self.load_seconds}

    def run(self, recipe_yaml: str, *, stage: int) -> StageResult:
        """Materialize (stage 1, or a single-stage trial) and evaluate; never raises."""
        import torch

        from merge_core.recipe import Recipe

        t0 = time.perf_counter()
        materialize = 0.0
        try:
            recipe = Recipe.from_yaml(recipe_yaml)
            if stage == 1 or self._loaded_digest != recipe.digest():
                bad = self.resident.materialize(recipe, self.model)
                self._loaded_digest = recipe.digest()
                if bad:
                    self._loaded_digest = None
                    return StageResult(worker=self.worker_id, stage=stage,
                                       error=f"candidate has {bad} non-finite weights (NaN/inf)",
                                       materialize_seconds=time.perf_counter() - t0)
            t1 = time.perf_counter()
            materialize = t1 - t0
            evaluator = self.stage1 if (stage == 1 and self.stage1 is not None) else self.full
            result = evaluator.evaluate(self.model)
            items, ids = scoring.per_item(result)
            return StageResult(worker=self.worker_id, stage=stage, final=evaluator is self.full,
                               score=scoring.score(self.campaign, result),
                               objectives=scoring.objectives(self.campaign, result),
                               domains=scoring.domain_metrics(result), items=items, item_ids=ids,
                               materialize_seconds=materialize, eval_seconds=time.perf_counter() - t1,
                               threads=torch.get_num_threads() if self.device == "cpu" else None)
        except Exception as exc:  # noqa: BLE001 - the study records it as a FAIL trial, with its traceback
            return StageResult(worker=self.worker_id, stage=stage, error=f"{type(exc).__name__}: {exc}",
                               traceback=traceback.format_exc(limit=8), materialize_seconds=materialize)
