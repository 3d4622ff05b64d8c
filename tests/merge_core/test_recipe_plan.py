"""Recipes read and write mergekit YAML; plans resolve per-layer and filtered parameters."""

from __future__ import annotations

import pytest
import yaml

from merge_core.checks import TensorInfo
from merge_core.errors import RecipeError
from merge_core.plan import build_plan, layer_of, with_layer
from merge_core.recipe import Recipe, evaluate_setting

MERGEKIT_TIES = """\
models:
  - model: org/base
  - model: org/legal
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: org/health
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
merge_method: ties
base_model: org/base
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
tokenizer_source: base
"""


def _infos(layers: int = 5, hidden: int = 4):
    names = {"model.embed_tokens.weight": (10, hidden), "model.norm.weight": (hidden,),
             "lm_head.weight": (10, hidden)}
    for i in range(layers):
        names[f"model.layers.{i}.self_attn.q_proj.weight"] = (hidden, hidden)
        names[f"model.layers.{i}.mlp.up_proj.weight"] = (2 * hidden, hidden)
    return {n: TensorInfo(shape=s, dtype="F32") for n, s in names.items()}


def test_reads_mergekit_recipe_and_writes_it_back():
    r = Recipe.from_yaml(MERGEKIT_TIES)
    assert r.merge_method == "ties" and r.base_model == "org/base" and r.dtype == "bfloat16"
    again = Recipe.from_yaml(r.to_yaml())
    assert again == r and again.digest() == r.digest()
    assert yaml.safe_load(r.to_yaml()) == yaml.safe_load(MERGEKIT_TIES)


def test_written_recipe_is_valid_for_mergekit():
    from mergekit.config import MergeConfiguration

    cfg = MergeConfiguration.model_validate(yaml.safe_load(Recipe.from_yaml(MERGEKIT_TIES).to_yaml()))
    assert cfg.merge_method == "ties" and len(cfg.models) == 3


def test_digest_changes_with_any_parameter():
    r = Recipe.from_yaml(MERGEKIT_TIES)
    other = Recipe.from_yaml(MERGEKIT_TIES.replace("density: 0.5", "density: 0.55"))
    assert r.digest() != other.digest()


@pytest.mark.parametrize("text, expected", [
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {wieght: 1}}]", "did you mean 'weight'"),
    ("merge_method: tie\nmodels: [{model: a}]", "did you mean 'ties'"),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]", "needs base_model"),
    ("merge_method: linear\nmodels: [{model: a}]\ndtype: float8", "dtype"),
    ("merge_method: linear", "exactly one of models"),
    ("merge_method: slerp\nbase_model: b\nmodels: [{model: a}, {model: c}, {model: b}]\nparameters: {t: 0.5}",
     "exactly 1 model"),
    ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [3, 1]}]}]", "layer_range"),
    ("merge_method: linear\nmodels: [{model: a}]\nfoo: 1", "unknown key 'foo'"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {normalize: true}}]", "top-level parameters"),
    ("models: [\n", "not valid YAML"),
])
def test_bad_recipes_get_one_line_errors(text, expected):
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml(text)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_several_errors_are_reported_at_once():
    with pytest.raises(RecipeError) as err:
        Recipe.from_yaml("merge_method: ties\nmodels: [{model: a, parameters: {wieght: 1}}]\ndtype: f8")
    msg = str(err.value)
    assert "wieght" in msg and "dtype" in msg and "base_model" in msg


def test_gradient_interpolation_like_mergekit():
    assert evaluate_setting((0.0, 1.0), tensor_name="x", t=0.25) == pytest.approx(0.25)
    assert evaluate_setting((0.0, 1.0, 0.0), tensor_name="x", t=0.75) == pytest.approx(0.5)
    filtered = ({"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": (0.0, 1.0)}, {"value": 9})
    assert evaluate_setting(filtered, tensor_name="model.layers.0.self_attn.q_proj.weight", t=0.5) == 0.1
    assert evaluate_setting(filtered, tensor_name="model.layers.0.mlp.up_proj.weight", t=0.5) == 0.5
    assert evaluate_setting(filtered, tensor_name="model.norm.weight", t=0.5) == 9


def test_one_value_per_layer_gives_each_layer_exactly_its_value():
    values = [0.11, 0.93, 0.27, 0.64, 0.05]
    recipe = Recipe.from_dict({
        "merge_method": "ties", "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": values, "density": 0.5}},
                   {"model": "b", "parameters": {"weight": 1.0, "density": [0.2, 0.4]}}],
    })
    infos = {m: _infos() for m in ("base", "a", "b")}
    plan = build_plan(recipe, infos=infos, configs={m: {"num_hidden_layers": 5} for m in infos})
    for tp in plan.tensors:
        if tp.layer is not None:
            assert tp.models[0]["weight"] == values[tp.layer]
            assert tp.models[1]["density"] == pytest.approx(0.2 + 0.2 * tp.layer / 4)
        else:
            assert tp.models[0]["weight"] == values[0]  # outside the layers: t = 0
    assert plan.num_layers == 5
    names = [t.name for t in plan.tensors]
    assert names[0] == "model.embed_tokens.weight" and names[-1] in ("lm_head.weight", "model.norm.weight")


def test_missing_required_parameter_names_the_model():
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": "base",
                               "models": [{"model": "a", "parameters": {"density": 0.5}}]})
    infos = {m: _infos() for m in ("base", "a")}
    with pytest.raises(RecipeError, match="'weight' is missing for model 'a'"):
        build_plan(recipe, infos=infos, configs={})


def test_passthrough_slices_stack_and_renumber_layers():
    recipe = Recipe.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 3]}]},
        {"sources": [{"model": "b", "layer_range": [2, 5]}]}]})
    infos = {m: _infos() for m in ("a", "b")}
    plan = build_plan(recipe, infos=infos, configs={})
    assert plan.num_layers == 6
    by_name = {t.name: t for t in plan.tensors}
    assert by_name["model.layers.4.mlp.up_proj.weight"].inputs == (("b", "model.layers.3.mlp.up_proj.weight"),)
    assert by_name["model.layers.1.mlp.up_proj.weight"].inputs == (("a", "model.layers.1.mlp.up_proj.weight"),)


def test_layer_name_helpers():
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_of("model.embed_tokens.weight") is None
    assert with_layer("model.layers.12.mlp.up_proj.weight", 3) == "model.layers.3.mlp.up_proj.weight"


def test_plan_is_hashable_and_seeds_differ_by_tensor():
    recipe = Recipe.from_dict({"merge_method": "dare_ties", "base_model": "base", "seed": 4,
                               "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}}]})
    infos = {m: _infos() for m in ("base", "a")}
    plan = build_plan(recipe, infos=infos, configs={})
    assert hash(plan) == hash(build_plan(recipe, infos=infos, configs={}))
    assert len({t.seed for t in plan.tensors}) == len(plan.tensors)
