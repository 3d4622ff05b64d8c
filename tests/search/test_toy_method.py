"""A merge method declared in a test module drives a real campaign without any change in
``search/``: the genome takes its parameter names and ranges from the method's ``Search``
declarations, the baselines its neutral values, the model count its ``min_models``/``max_models``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from merge_core import methods
from merge_core.methods.base import MergeParams, MethodInfo, Param, Scope, Search, compute_dtype
from search import trials as T
from search.campaign import CampaignError, parse_campaign
from search.driver import run_campaign


@dataclass(frozen=True)
class ToyBlend(MethodInfo):
    """base + gain x sum_i mix_i x (model_i - base): task arithmetic with other names and ranges."""

    @property
    def params(self) -> tuple[Param, ...]:
        return (Param("mix", float, Scope.MODEL, doc="share of this model's delta",
                      search=Search(0.0, 2.0, neutral=0.5, selects_model=True)),
                Param("gain", float, Scope.SHARED, 1.0, "scale of the summed deltas", search=Search(0.0, 1.0)),
                Param("unsearched", float, Scope.SHARED, 0.0, "never searched (no Search)"))

    def merge(self, base, tensors: Sequence, params: MergeParams, *, seed: int = 0):
        work = compute_dtype(base)
        delta = sum(float(p["mix"]) * (t.to(work) - base.to(work)) for t, p in zip(tensors, params.models))
        return (base.to(work) + float(params.shared["gain"]) * delta).to(base.dtype)


@pytest.fixture
def toy_method():
    methods.register(ToyBlend(name="toy_blend", title="Toy blend", min_models=2, max_models=2))
    try:
        yield "toy_blend"
    finally:
        methods.unregister("toy_blend")
    assert "toy_blend" not in methods.names()


def _campaign(zoo, *, models, params, trials: int = 2) -> dict:
    return {"name": "toy", "base_model": str(zoo["base"]), "models": [str(zoo[m]) for m in models],
            "method": "toy_blend", "sampler": "random",
            "search": {"granularity": "global", "params": params},
            "objectives": {"legal": 1.0, "health": 1.0}, "eval": {"suite": "sample", "limit": 4},
            "budget": {"trials": trials}, "workers": {"count": 1, "executor": "local"}, "seed": 3}


def test_validation_reads_the_methods_declarations(toy_method, tiny_zoo):
    ok = {"mix": [0.0, 2.0], "gain": [0.25, 1.0]}
    with pytest.raises(CampaignError, match=r"search.params.mix \[0.0, 3.0\] must lie within \[0, 2\]"):
        parse_campaign(_campaign(tiny_zoo, models=["ft_a", "ft_b"], params={**ok, "mix": [0.0, 3.0]}))
    with pytest.raises(CampaignError, match="toy_blend merges exactly 2 fine-tune"):
        parse_campaign(_campaign(tiny_zoo, models=["ft_a", "ft_b", "ft_c"], params=ok))
    with pytest.raises(CampaignError, match="no searchable parameter 'unsearched'"):
        parse_campaign(_campaign(tiny_zoo, models=["ft_a", "ft_b"], params={**ok, "unsearched": [0.0, 1.0]}))
    with pytest.raises(CampaignError, match="must include mix"):
        parse_campaign(_campaign(tiny_zoo, models=["ft_a", "ft_b"], params={"gain": [0.0, 1.0]}))


def test_a_two_trial_campaign_over_a_test_method(toy_method, tiny_zoo, tmp_path):
    campaign = parse_campaign(_campaign(tiny_zoo, models=["ft_a", "ft_b"],
                                        params={"mix": [0.0, 2.0], "gain": [0.25, 1.0]}))
    study = run_campaign(campaign, tmp_path / "run", progress=False)
    done = T.finished_trials(study)
    assert [t.state for t in done] == [T.TrialState.COMPLETE] * 2
    # the genome: the toy's two searchable parameters, per model and shared, in the campaign's
    # ranges (which the declared bounds admitted); "unsearched" has no Search and no gene
    assert {n: (d.low, d.high) for n, d in done[0].distributions.items()} == {
        "m0.mix.all": (0.0, 2.0), "m1.mix.all": (0.0, 2.0), "shared.gain.all": (0.25, 1.0)}
    # the baselines: uniform (every mix at its neutral 0.5, gain at the middle of its range),
    # then the first fine-tune alone (its mix neutral, the other's 0)
    assert T.view(done[0]).baseline == "uniform"
    assert done[0].params == {"m0.mix.all": 0.5, "m1.mix.all": 0.5, "shared.gain.all": 0.625}
    assert done[1].params == {"m0.mix.all": 0.5, "m1.mix.all": 0.0, "shared.gain.all": 0.625}
    recipe = T.view(done[1]).recipe
    assert "merge_method: toy_blend" in recipe and "gain: 0.625" in recipe
    assert all(0.0 <= T.view(t).score <= 1.0 for t in done)
