"""The worker parses a recipe only to materialize it, and trusts the job's digest (no re-hash)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from merge_core.recipe import Recipe
from search import scoring
from search.worker import TrialWorker


@pytest.fixture
def worker(monkeypatch):
    calls = {"parse": [], "hash": 0, "materialize": []}

    def parse(cls, text, **kw):
        calls["parse"].append(text)
        return SimpleNamespace(text=text, digest=lambda: calls.__setitem__("hash", calls["hash"] + 1) or text)

    monkeypatch.setattr(Recipe, "from_yaml", classmethod(parse))
    for name, value in {"per_item": ({}, {}), "groups_of": {}, "score": 0.5, "objectives": (0.5,),
                        "domain_metrics": {}}.items():
        monkeypatch.setattr(scoring, name, lambda *a, _v=value, **k: _v)
    w = TrialWorker.__new__(TrialWorker)   # no models: only run()'s bookkeeping is under test
    w.campaign, w.worker_id, w.device, w._loaded_digest = None, 0, "cuda", None
    w.split_stages, w._cache_sized, w.dtype = False, True, torch.float32   # no staged scores, cache sized
    w.pairs = {}
    w.model = torch.nn.Linear(1, 1)   # a stand-in module: what run() reads off a model, it finds
    w.resident = SimpleNamespace(materialize=lambda recipe, model: calls["materialize"].append(recipe.text) or 0)
    w.stage1 = w.full = SimpleNamespace(evaluate=lambda model: None)
    return w, calls


def test_with_the_jobs_digest_the_yaml_is_parsed_once_per_materialization_and_never_hashed(worker):
    w, calls = worker
    for text, stage, digest in [("a", 1, "da"), ("a", 2, "da"), ("b", 1, "db"), ("b", 2, "db")]:
        assert not w.run(text, stage=stage, digest=digest).failed
    assert calls["parse"] == ["a", "b"] and calls["materialize"] == ["a", "b"] and calls["hash"] == 0


def test_stage_2_of_another_recipe_than_the_loaded_one_materializes_it(worker):
    w, calls = worker
    w.run("a", stage=1, digest="da")
    w.run("b", stage=2, digest="db")
    assert calls["materialize"] == ["a", "b"]


def test_without_a_digest_the_recipe_is_parsed_and_hashed_once_per_stage(worker):
    w, calls = worker
    w.run("a", stage=1)
    w.run("a", stage=2)
    assert calls["parse"] == ["a", "a"] and calls["hash"] == 2 and calls["materialize"] == ["a"]
