"""The trial worker: one per GPU (or CPU slot), holding for the whole campaign the
resident base and sources, one live model, and its evaluators.

A trial only re-materializes weights in place and evaluates. Staged evaluation: stage 1
scores a small subset; the scheduler decides whether to prune; stage 2 scores the full dev
limit on the weights already in place. When stage 1's items are a part of the full
evaluator's (the usual case, see ``scoring.stage1_in_full``), stage 1 scores that part, the
worker keeps its per-item scores by recipe digest, and stage 2 scores only the rest: the
final score is bit-identical to scoring every item at once. A stage 2 that finds no stage-1
scores for its digest (a requeue to another worker) scores everything.

The live model runs in ``eval.dtype`` (``merge_core.dtypes.compute_dtype``), the sources are
kept where ``workers.sources`` says, and the magnitude cache is sized after the first
evaluation, from what the evaluator's peak left free. ``run`` never raises: a failure comes
back as a ``StageResult`` with the error and its traceback, which the study records.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from collections import OrderedDict
from typing import Any

from search import scoring
from search.campaign import Campaign
from search.stage import StageResult

KEPT_STAGE1 = 8      # recent stage-1 score sets kept for their stage 2 (a few floats per item each)
log = logging.getLogger("brmerge.worker")


def sources_setting(campaign: Campaign, device: str) -> str:
    """``workers.sources`` resolved: ``auto`` asks the memory plan (``brmerge plan``) whether the
    worker fits with the sources on the device; on a CPU, host and device are one memory."""
    setting = getattr(campaign, "sources", "device")
    if setting != "auto":
        return setting
    if not device.startswith("cuda"):
        return "device"
    from search.sizing_inputs import local_device
    from search.sizing_report import choose_sources

    gpu, gib = local_device()
    return choose_sources(campaign, gpu=gpu, memory_gib=gib)


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
        self.sources = sources_setting(campaign, self.device)
        cache = getattr(campaign, "magnitude_cache", "auto")   # auto: BRMERGE_MAGNITUDE_CACHE, else 40%
        self.resident = ResidentModels(campaign.base_model, list(campaign.models), device=self.device,
                                       keep=self.sources,
                                       magnitude_cache_bytes={"auto": None, "off": "0"}.get(cache, cache))
        self.resident.defer_magnitude_cache()     # sized after the first evaluation's peak
        self.dtype = self.resident.compute_dtype(getattr(campaign, "dtype", "auto"))
        self.model = self.resident.load_module(dtype=self.dtype)
        tok_dir = str(self.resident.sources[campaign.base_model].path)
        self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        self.full, self.stage1 = scoring.stage_evaluators(campaign, self.tokenizer)
        self.split_stages = self.stage1 is not None and scoring.stage1_in_full(self.full, self.stage1)
        self.pairs = scoring.pair_lookup(*(ev for ev in (self.full, self.stage1) if ev is not None))
        self._stage1_scores: OrderedDict[str, dict[int, tuple[int, float]]] = OrderedDict()
        self._cache_sized = False
        self.load_seconds = time.perf_counter() - start
        self._loaded_digest: str | None = None
        log.info("worker %s: live model %s, sources on the %s, stage 2 %s", worker_id,
                 str(self.dtype).removeprefix("torch."), self.sources,
                 "scores only what stage 1 did not" if self.split_stages else "scores every item")

    def info(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "device": self.device, "host": socket.gethostname(),
                "pid": os.getpid(), "load_seconds": self.load_seconds,
                "dtype": str(self.dtype).removeprefix("torch."), "sources": self.sources}

    def _evaluate(self, stage: int, digest: str) -> tuple[Any, bool]:
        """(result, final) of one stage on the weights in place (see the module docstring)."""
        if stage == 1 and self.stage1 is not None:
            if not self.split_stages:
                return self.stage1.evaluate(self.model), False
            scores = self.full.scores(self.model, part="first")
            self._stage1_scores[digest] = scores
            while len(self._stage1_scores) > KEPT_STAGE1:
                self._stage1_scores.popitem(last=False)
            return self.full.result_of(scores), False
        kept = self._stage1_scores.pop(digest, None) if self.split_stages else None
        if kept is None:
            return self.full.evaluate(self.model), True
        return self.full.result_of({**kept, **self.full.scores(self.model, part="rest")}), True

    def run(self, recipe_yaml: str, *, stage: int, digest: str | None = None) -> StageResult:
        """Materialize (stage 1, or a single-stage trial) and evaluate; never raises.

        ``digest``: the recipe's digest as the job carries it. With it, the YAML is parsed only
        when the weights must be materialized (stage 1, or another recipe than the loaded one),
        and never hashed again; without it, it is parsed and hashed once."""
        import torch

        from merge_core.recipe import Recipe

        t0 = time.perf_counter()
        materialize = 0.0
        try:
            recipe = None
            if digest is None:
                recipe = Recipe.from_yaml(recipe_yaml)
                digest = recipe.digest()
            if stage == 1 or self._loaded_digest != digest:
                recipe = recipe or Recipe.from_yaml(recipe_yaml)
                bad = self.resident.materialize(recipe, self.model)
                self._loaded_digest = digest
                if bad:
                    self._loaded_digest = None
                    return StageResult(worker=self.worker_id, stage=stage,
                                       error=f"candidate has {bad} non-finite weights (NaN/inf)",
                                       materialize_seconds=time.perf_counter() - t0)
            t1 = time.perf_counter()
            materialize = t1 - t0
            result, final = self._evaluate(stage, digest)
            if not self._cache_sized:             # the evaluator has reached its peak once
                self._cache_sized = True
                self.resident.size_magnitude_cache()
            items, ids = scoring.per_item(result)
            return StageResult(worker=self.worker_id, stage=stage, final=final,
                               score=scoring.score(self.campaign, result),
                               objectives=scoring.objectives(self.campaign, result),
                               domains=scoring.domain_metrics(result), items=items, item_ids=ids,
                               item_groups=scoring.groups_of(self.pairs, result),
                               materialize_seconds=materialize, eval_seconds=time.perf_counter() - t1,
                               threads=torch.get_num_threads() if self.device == "cpu" else None,
                               dtype=str(self.dtype).removeprefix("torch."))
        except Exception as exc:  # noqa: BLE001 - the study records it as a FAIL trial, with its traceback
            return StageResult(worker=self.worker_id, stage=stage, error=f"{type(exc).__name__}: {exc}",
                               traceback=traceback.format_exc(limit=8), materialize_seconds=materialize)
