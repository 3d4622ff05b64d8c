"""Campaign files and the genome <-> recipe mapping (no Ray, no models)."""

from __future__ import annotations

import pytest
import yaml

from merge_core.checks import TensorInfo
from merge_core.plan import build_plan
from search.campaign import TEMPLATE, CampaignError, parse_campaign
from search.genome import GenomeSpace


def _campaign(**over):
    data = {"name": "c", "base_model": "base", "models": ["a", "b"], "method": "ties",
            "eval": {"suite": "sample", "limit": 8}}
    data.update(over)
    return parse_campaign(data)


def test_template_names_every_key_and_only_needs_models():
    data = yaml.safe_load(TEMPLATE)
    with pytest.raises(CampaignError) as err:
        parse_campaign(data)
    assert "base_model" in str(err.value) and "placeholders" in str(err.value)
    data.update(base_model="base", models=["a", "b"])
    c = parse_campaign(data)
    assert c.method == "dare_ties" and c.sampler == "tpe" and c.stage1 == 50 and c.limit == 200


def test_all_errors_reported_at_once():
    with pytest.raises(CampaignError) as err:
        parse_campaign({"name": "bad name!", "base_model": "b", "models": ["a"], "method": "tie",
                        "sampler": "cma", "objectives": {"legl": 1}, "search": {"granularity": "blocks:2",
                        "params": {"wieght": [0, 1]}}, "budget": {"trials": 0}, "workerz": {}})
    msg = str(err.value)
    for fragment in ("name", "did you mean 'ties'", "sampler 'cma'", "did you mean 'legal'",
                     "granularity", "budget.trials", "unknown key 'workerz'"):
        assert fragment in msg, fragment
    assert "\n" not in msg


def test_test_split_refused_for_search_unless_allowed():
    with pytest.raises(CampaignError, match="held-out"):
        _campaign(eval={"suite": "test"})
    assert _campaign(eval={"suite": "test", "allow_test": True}).suite == "test"


def test_param_ranges_validated_against_the_method():
    with pytest.raises(CampaignError, match="no searchable parameter 'epsilon'"):
        _campaign(search={"params": {"weight": [0, 1], "epsilon": [0.1, 0.2]}})
    with pytest.raises(CampaignError, match="within"):
        _campaign(search={"params": {"weight": [0, 1], "density": [0.5, 1.5]}})
    assert _campaign(method="della", search={"params": {"weight": [0, 1], "epsilon": [0.05, 0.1]}})


def _infos(layers=6):
    names = {"model.embed_tokens.weight": (10, 4), "model.norm.weight": (4,), "lm_head.weight": (10, 4)}
    for i in range(layers):
        names[f"model.layers.{i}.self_attn.q_proj.weight"] = (4, 4)
        names[f"model.layers.{i}.mlp.up_proj.weight"] = (8, 4)
        names[f"model.layers.{i}.input_layernorm.weight"] = (4,)
    return {n: TensorInfo(shape=s, dtype="F32") for n, s in names.items()}


@pytest.mark.parametrize("granularity, groups", [("layer", 6), ("block:4", 2), ("global", 1)])
def test_genome_maps_to_per_layer_recipe(granularity, groups):
    c = _campaign(search={"granularity": granularity, "params": {"weight": [0, 2], "density": [0.1, 1]}})
    space = GenomeSpace(c, 6)
    names = space.param_names()
    assert len(names) == 2 * 2 * groups
    params = {n: (i % 7) / 7 + 0.1 for i, n in enumerate(names)}
    recipe = space.to_recipe(params)
    infos = {m: _infos() for m in ("base", "a", "b")}
    plan = build_plan(recipe, infos=infos, configs={m: {"num_hidden_layers": 6} for m in infos})
    size = {"layer": 1, "block:4": 4, "global": 6}[granularity]
    for tp in plan.tensors:
        if tp.layer is None:
            continue
        group = {"layer": f"L{tp.layer:02d}", "block:4": f"B{tp.layer // 4:02d}", "global": "all"}[granularity]
        assert tp.models[0]["weight"] == pytest.approx(params[f"m0.weight.{group}"])
        assert tp.models[1]["density"] == pytest.approx(params[f"m1.density.{group}"])
    assert size


def test_split_attention_and_mlp():
    c = _campaign(search={"granularity": "layer", "split_attn_mlp": True, "params": {"weight": [0, 1]}})
    space = GenomeSpace(c, 6)
    params = {n: (0.9 if ".attn." in n else 0.2) for n in space.param_names()}
    plan = build_plan(space.to_recipe(params), infos={m: _infos() for m in ("base", "a", "b")},
                      configs={m: {"num_hidden_layers": 6} for m in ("base", "a", "b")})
    for tp in plan.tensors:
        if "self_attn" in tp.name:
            assert tp.models[0]["weight"] == pytest.approx(0.9)
        elif "mlp" in tp.name:
            assert tp.models[0]["weight"] == pytest.approx(0.2)
        elif tp.layer is not None:
            assert tp.models[0]["weight"] == pytest.approx(0.55)


def test_baselines_uniform_first_then_each_model_alone():
    c = _campaign(search={"params": {"weight": [0, 2], "density": [0.1, 1.0]}})
    base = GenomeSpace(c, 6).baselines()
    assert [name for name, _ in base] == ["uniform", "model:a", "model:b"]
    uniform = base[0][1]
    assert all(v == 1.0 for k, v in uniform.items())
    alone = base[1][1]
    assert alone["m0.weight.L00"] == 1.0 and alone["m1.weight.L03"] == 0.0 and alone["m1.density.L03"] == 1.0


def test_a_searched_lambda_keeps_its_default_in_the_baselines():
    # lambda scales the merged task vector: at the middle of its range (as a parameter without
    # a neutral value gets) the "model alone" baseline was base + 1.75 x its update, not the model
    c = _campaign(search={"params": {"weight": [0, 2], "density": [0.1, 1.0], "lambda": [0.5, 3.0]}})
    base = GenomeSpace(c, 2).baselines()
    assert [name for name, _ in base] == ["uniform", "model:a", "model:b"]
    for _, genome in base:
        assert genome["shared.lambda.L00"] == genome["shared.lambda.L01"] == 1.0
    narrow = _campaign(search={"params": {"weight": [0, 2], "lambda": [1.5, 3.0]}})
    assert GenomeSpace(narrow, 2).baselines()[0][1]["shared.lambda.L00"] == 1.5   # clamped into the range


def test_a_model_alone_baseline_with_a_searched_lambda_is_that_model():
    import torch

    from merge_core.methods import get as get_method
    from merge_core.methods.base import MergeParams, Scope

    c = _campaign(search={"params": {"weight": [0, 2], "density": [0.1, 1.0], "lambda": [0.5, 3.0]}})
    alone = dict(GenomeSpace(c, 1).baselines())["model:a"]
    method = get_method("ties")
    gen = torch.Generator().manual_seed(0)
    base_t, a, b = (torch.randn(64, generator=gen) for _ in range(3))
    shared = {p.name: p.default for p in method.params if p.scope is Scope.SHARED}
    shared["lambda"] = alone["shared.lambda.L00"]
    models = [{"weight": alone[f"m{i}.weight.L00"], "density": alone[f"m{i}.density.L00"]} for i in range(2)]
    merged = method.merge(base_t, [a, b], MergeParams(models=models, shared=shared))
    torch.testing.assert_close(merged, a)


def _staged(**ev):
    return _campaign(objectives={"legal": 1.0, "health": 1.0}, eval={"suite": "sample", **ev})


def test_stage1_false_turns_staging_off_and_null_is_automatic():
    assert _staged(limit=200, stage1=False).stage1 is None
    assert _staged(limit=200, stage1=None).stage1 == 50          # a quarter of limit
    assert _staged(limit=200).stage1 == 50                        # null is the default
    assert _staged(limit=None).stage1 is None                     # every item scored: no stage 1
    # never below the size at which the pruning test can fire: 5 pooled items at alpha 0.05 -> 3 per domain
    assert _staged(limit=8).stage1 == 3
    assert _staged(limit=3).stage1 is None                        # no larger full stage would remain


def test_a_stage1_too_small_for_the_pruning_test_is_refused():
    from evals.stats import min_items_for_significance

    assert min_items_for_significance(0.05) == 5
    with pytest.raises(CampaignError, match="can never fire on fewer than 3 items per task"):
        _staged(limit=20, stage1=2)
    # a stricter level needs more items: 0.5**7 <= 0.01 -> 7 pooled -> 4 per domain
    with pytest.raises(CampaignError, match="fewer than 4 items"):
        _staged(limit=20, stage1=3, prune_alpha=0.01)
    assert _staged(limit=20, stage1=4, prune_alpha=0.01).prune_alpha == 0.01
    with pytest.raises(CampaignError, match="prune_alpha"):
        _staged(limit=20, prune_alpha=0.9)


def test_chat_template_is_a_boolean_off_by_default():
    assert _campaign().chat_template is False
    assert _campaign(eval={"suite": "sample", "chat_template": True}).chat_template is True
    with pytest.raises(CampaignError, match="eval.chat_template 'yes' must be true or false"):
        _campaign(eval={"suite": "sample", "chat_template": "yes"})


def test_the_leaderboard_suite_is_not_a_search_objective():
    with pytest.raises(CampaignError, match="eval.suite 'leaderboard'"):
        _campaign(eval={"suite": "leaderboard"})


def test_whole_merge_parameters_are_searched_per_layer_for_sce_nearswap_and_multislerp():
    layers = 4
    sce = _campaign(method="sce", search={"granularity": "layer", "params": {"select_topk": [0.2, 1.0]}})
    space = GenomeSpace(sce, layers)
    assert space.param_names() == [f"shared.select_topk.L{i:02d}" for i in range(layers)]
    params = {n: 0.2 + 0.2 * i for i, n in enumerate(space.param_names())}
    recipe = yaml.safe_load(space.to_recipe(params).to_yaml())
    assert recipe["parameters"]["select_topk"] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert all("parameters" not in m for m in recipe["models"])
    assert [name for name, _ in space.baselines()] == ["uniform"]            # no weights to single out
    assert set(space.baselines()[0][1].values()) == {1.0}                     # keep everything, like density

    near = _campaign(method="nearswap", models=["a"], search={"granularity": "global", "params": {"t": [0.0, 0.5]}})
    space = GenomeSpace(near, layers)
    assert space.param_names() == ["shared.t.all"]
    assert yaml.safe_load(space.to_recipe({"shared.t.all": 0.25}).to_yaml())["parameters"]["t"] == 0.25
    with pytest.raises(CampaignError, match="nearswap merges exactly 1 fine-tune"):
        _campaign(method="nearswap", search={"params": {"t": [0.0, 0.5]}})
    with pytest.raises(CampaignError, match="must lie within"):
        _campaign(method="sce", search={"params": {"select_topk": [0.5, 1.5]}})

    multi = _campaign(method="multislerp", search={"granularity": "global", "params": {"weight": [0.0, 1.0]}})
    space = GenomeSpace(multi, layers)
    assert space.param_names() == ["m0.weight.all", "m1.weight.all"]
    recipe = space.to_recipe({"m0.weight.all": 0.3, "m1.weight.all": 0.7})
    assert yaml.safe_load(recipe.to_yaml())["merge_method"] == "multislerp"


def test_non_finite_ranges_and_methods_without_a_base_are_refused():
    with pytest.raises(CampaignError, match="finite"):
        _campaign(search={"params": {"weight": [0, float("inf")]}})
    with pytest.raises(CampaignError, match="ignores the base model"):
        _campaign(method="karcher", search={"params": {"weight": [0, 1]}})


def test_untyped_eval_and_ray_fields_are_one_line_errors():
    with pytest.raises(CampaignError) as err:
        _campaign(eval={"suite": "sample", "data_dir": 5, "num_fewshot": "3"}, ray={"address": 12345})
    msg = str(err.value)
    assert "eval.data_dir 5 must be a folder path" in msg
    assert "eval.num_fewshot '3'" in msg and "ray.address 12345" in msg and "\n" not in msg
    with pytest.raises(CampaignError, match="num_fewshot -1"):
        _campaign(eval={"suite": "sample", "num_fewshot": -1})


def test_model_counts_and_ranges_come_from_the_methods_declarations():
    from merge_core import methods

    for name in methods.names():
        method = methods.get(name)
        searched = {p.name: p.search for p in method.params if p.search is not None}
        if method.base.value == "ignored" or not searched:
            continue
        # each searched parameter over the part of [0, 1] its declaration admits
        params = {p: [max(0.0, s.low), min(1.0, s.high)] for p, s in searched.items()}
        n_ok = max(method.min_models, min(3, method.max_models or 3))
        c = _campaign(method=name, models=[f"m{i}" for i in range(n_ok)], search={"params": params})
        assert set(c.params) == set(searched) and len(c.models) == n_ok
        assert set(c.shared_params) == {p.name for p in method.params
                                        if p.search is not None and p.scope.value == "shared"}
        for n_bad in (method.min_models - 1, (method.max_models or 99) + 1):
            if 1 <= n_bad <= 4:
                with pytest.raises(CampaignError, match=f"{name} merges .* models has {n_bad}"):
                    _campaign(method=name, models=[f"m{i}" for i in range(n_bad)], search={"params": params})
    with pytest.raises(CampaignError, match="nuslerp merges exactly 2"):
        _campaign(method="nuslerp", models=["a", "b", "c"], search={"params": {"weight": [0, 1]}})
