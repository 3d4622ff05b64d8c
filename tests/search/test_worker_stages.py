"""Stage 2 scores only what stage 1 did not, and the final score stays exact."""

from __future__ import annotations

import pytest

from merge_core.recipe import Recipe
from search import scoring
from search.campaign import parse_campaign
from search.worker import TrialWorker


def _campaign(zoo, **workers):
    return parse_campaign({
        "name": "c", "base_model": str(zoo["base"]), "models": [str(zoo["ft_a"]), str(zoo["ft_b"])],
        "method": "ties", "objectives": {"legal": 1.0, "enem": 1.0},
        "eval": {"suite": "sample", "limit": 8, "num_fewshot": 1},   # stage1: automatic (3)
        "workers": {"count": 1, "gpus_per_worker": 0, **workers}})


def _recipe(zoo) -> tuple[str, str]:
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": str(zoo["base"]), "models": [
        {"model": str(zoo["ft_a"]), "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": str(zoo["ft_b"]), "parameters": {"weight": 0.4, "density": 0.7}}]})
    return recipe.to_yaml(), recipe.digest()


def _spy(worker):
    parts = []
    scores = worker.full.scores

    def spy(model, *, part=None, progress=False):
        out = scores(model, part=part, progress=progress)
        parts.append((part, len(out)))
        return out

    worker.full.scores = spy
    return parts


@pytest.fixture(scope="module")
def staged(tiny_zoo):
    campaign = _campaign(tiny_zoo)
    assert campaign.stage1 == 3
    return campaign, TrialWorker(campaign, 0)


def test_stage_2_scores_the_rest_and_equals_a_single_stage_score(staged, tiny_zoo):
    campaign, worker = staged
    yaml, digest = _recipe(tiny_zoo)
    assert worker.split_stages
    parts = _spy(worker)
    one = worker.run(yaml, stage=1, digest=digest)
    two = worker.run(yaml, stage=2, digest=digest)
    assert not one.failed and not two.failed and two.final and not one.final
    n = len(worker.full.requests)
    assert parts == [("first", 6), ("rest", n - 6)]               # 3 items x 2 domains, then the rest
    assert one.item_ids == scoring.per_item(worker.stage1.evaluate(worker.model))[1]  # stage 1's items
    whole = worker.full.evaluate(worker.model)                    # the single-stage score
    assert two.score == scoring.score(campaign, whole)            # exact, not approximately
    assert (two.items, two.item_ids) == scoring.per_item(whole)
    # each item's twin group travels with it, in the same order (the sample suite has none)
    assert two.item_groups == scoring.item_clusters(worker.full, whole)
    assert {d: len(v) for d, v in one.item_groups.items()} == {d: len(v) for d, v in one.item_ids.items()}
    assert two.domains == scoring.domain_metrics(whole)
    assert two.dtype == "float32"                                 # CPU: auto is float32


def test_stage_2_without_stage_1_results_scores_everything(staged, tiny_zoo):
    campaign, worker = staged
    yaml, digest = _recipe(tiny_zoo)
    worker.run(yaml, stage=1, digest=digest)
    first = worker.run(yaml, stage=2, digest=digest)
    parts = _spy(worker)
    again = worker.run(yaml, stage=2, digest=digest)              # a requeue: stage 1 ran elsewhere
    assert parts == [(None, len(worker.full.requests))]
    assert again.score == first.score and again.items == first.items


def test_sources_on_the_host_score_exactly_as_on_the_device(staged, tiny_zoo):
    _, worker = staged
    yaml, digest = _recipe(tiny_zoo)
    device = worker.run(yaml, stage=2, digest=digest)
    host = TrialWorker(_campaign(tiny_zoo, sources="host"), 1)
    assert host.sources == "host" and host.resident.keep == "host"
    got = host.run(yaml, stage=2, digest=digest)
    assert got.score == device.score and got.items == device.items
    assert TrialWorker(_campaign(tiny_zoo, sources="auto"), 2).sources == "device"   # CPU: one memory
