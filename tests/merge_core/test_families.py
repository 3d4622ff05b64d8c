"""Every family: stacked outputs load, per-layer config lists follow the stack, tied heads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_core.io import load_state
from merge_core.materialize import merge_to_disk
from merge_core.recipe import Recipe
from tests.merge_core.families import FAMILIES, make_family


def _stack(a: Path, b: Path) -> Recipe:
    return Recipe.from_dict({
        "slices": [{"sources": [{"model": str(a), "layer_range": [0, 3]}]},
                   {"sources": [{"model": str(b), "layer_range": [1, 4]}]}],
        "merge_method": "passthrough", "dtype": "float32"})


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_model_loads_and_takes_each_layer_from_its_slice(family, family_zoo, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    zoo = family_zoo(family)
    merge_to_disk(_stack(zoo["ft_a"], zoo["ft_b"]), tmp_path / "out", device="cpu", progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    src = json.loads((zoo["ft_a"] / "config.json").read_text())
    depth_key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    assert config[depth_key] == 6
    if "layer_types" in src:
        assert config["layer_types"] == src["layer_types"][0:3] + src["layer_types"][1:4]
    for key, value in config.items():  # no per-layer list left at the old depth
        assert not (isinstance(value, list) and len(value) == 4), key
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert AutoConfig.from_pretrained(str(tmp_path / "out")).num_hidden_layers == 6
    out = load_state(tmp_path / "out")
    a, b = load_state(zoo["ft_a"]), load_state(zoo["ft_b"])
    layer = "transformer.h.{}.ln_1.weight" if family == "gpt2" else "model.layers.{}.input_layernorm.weight"
    for i, (source, j) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        assert torch.equal(out[layer.format(i)], source[layer.format(j)])
    for name in out:  # outside the layers: input side from the first slice, the rest from the last
        if ".layers." in name or ".h." in name:
            continue
        first = any(k in name for k in ("embed", "wte", "wpe"))
        assert torch.equal(out[name], (a if first else b)[name]), name
    assert model.config.num_hidden_layers == 6


def test_gpt2_position_embeddings_come_from_the_first_slice(family_zoo, tmp_path):
    zoo = family_zoo("gpt2")
    merge_to_disk(_stack(zoo["ft_a"], zoo["ft_b"]), tmp_path / "out", device="cpu", progress=False)
    out, a, b = (load_state(p) for p in (tmp_path / "out", zoo["ft_a"], zoo["ft_b"]))
    assert not torch.equal(a["transformer.wpe.weight"], b["transformer.wpe.weight"])
    assert torch.equal(out["transformer.wpe.weight"], a["transformer.wpe.weight"])


def test_index_lists_are_remapped_to_the_stack():
    from merge_core.configs import stacked_config

    config = {"num_hidden_layers": 4, "mlp_only_layers": [1], "layer_types": ["a", "b", "c", "d"]}
    out = stacked_config(config, num_layers=6, layer_sources=[(config, i) for i in (0, 1, 2, 1, 2, 3)])
    assert out["mlp_only_layers"] == [1, 3]
    assert out["layer_types"] == ["a", "b", "c", "b", "c", "d"]
    assert stacked_config(config, num_layers=4, layer_sources=[]) == config


def _with_saved_head(src: Path, dst: Path, *, noise: float = 0.01) -> Path:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    embed = next(k for k in state if k.endswith(("embed_tokens.weight", "wte.weight")))
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state[embed] + noise * torch.randn(state[embed].shape,
                                                                 generator=torch.Generator().manual_seed(5))
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "gemma", "gemma2"])
@pytest.mark.parametrize("head_on", ["base", "fine_tune"])
def test_tied_base_with_a_fine_tune_that_saved_its_head(family, head_on, tmp_path, tiny_zoo):
    zoo = make_family(family, tmp_path, tokenizer_dir=tiny_zoo["tokenizer"], fine_tunes=1, tie=True)
    saved = _with_saved_head(zoo["base" if head_on == "base" else "ft_a"], tmp_path / "with-head")
    base, ft = (saved, zoo["ft_a"]) if head_on == "base" else (zoo["base"], saved)
    recipe = Recipe.from_dict({"models": [{"model": str(base)}, {"model": str(ft), "parameters": {"weight": 0.5}}],
                               "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32"})
    merge_to_disk(recipe, tmp_path / "out", device="cpu", progress=False)
    out = load_state(tmp_path / "out")
    if family == "gemma":  # mergekit's architecture has no separate head here
        assert "lm_head.weight" not in out
        return
    b, f = load_state(base), load_state(ft)
    embed = "transformer.wte.weight" if family == "gpt2" else "model.embed_tokens.weight"
    head_b = b.get("lm_head.weight", b[embed])
    head_f = f.get("lm_head.weight", f[embed])
    torch.testing.assert_close(out["lm_head.weight"], head_b + 0.5 * (head_f - head_b), rtol=0, atol=1e-6)


def test_multimodal_towers_keep_their_own_depth(family_zoo, tmp_path):
    from transformers import AutoModelForImageTextToText

    from merge_core.plan import num_layers

    zoo = family_zoo("gemma3_mm")
    config = json.loads((zoo["base"] / "config.json").read_text())
    assert num_layers(config, list(load_state(zoo["base"]))) == 4    # the language model's layers
    recipe = Recipe.from_dict({
        "models": [{"model": str(zoo["ft_a"]), "parameters": {"weight": [1.0, 0.0]}},
                   {"model": str(zoo["ft_b"]), "parameters": {"weight": [0.0, 1.0]}}],
        "merge_method": "linear", "dtype": "float32"})
    merge_to_disk(recipe, tmp_path / "out", device="cpu", progress=False)
    out, a, b = (load_state(p) for p in (tmp_path / "out", zoo["ft_a"], zoo["ft_b"]))
    assert sorted(out) == sorted(a)
    vision = "vision_tower.vision_model.encoder.layers.{}.mlp.fc1.weight"
    text = "language_model.model.layers.{}.mlp.up_proj.weight"
    # a gradient runs over each stack's own depth: first layer all ft_a, last layer all ft_b
    assert torch.equal(out[vision.format(0)], a[vision.format(0)])
    assert torch.equal(out[vision.format(2)], b[vision.format(2)])
    assert torch.equal(out[text.format(0)], a[text.format(0)])
    assert torch.equal(out[text.format(3)], b[text.format(3)])
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "num_hidden_layers" not in written and written["text_config"]["num_hidden_layers"] == 4
    assert written["vision_config"]["num_hidden_layers"] == 3
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"


def test_multimodal_stack_takes_towers_from_the_first_slice(family_zoo, tmp_path):
    from transformers import AutoModelForImageTextToText

    zoo = family_zoo("gemma3_mm")
    merge_to_disk(_stack(zoo["ft_a"], zoo["ft_b"]), tmp_path / "out", device="cpu", progress=False)
    out, a, b = (load_state(p) for p in (tmp_path / "out", zoo["ft_a"], zoo["ft_b"]))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    src = json.loads((zoo["ft_a"] / "config.json").read_text())["text_config"]
    assert config["text_config"]["num_hidden_layers"] == 6
    assert config["text_config"]["layer_types"] == src["layer_types"][0:3] + src["layer_types"][1:4]
    assert config["vision_config"]["num_hidden_layers"] == 3
    for name in out:
        if name.startswith(("vision_tower.", "multi_modal_projector.", "language_model.model.embed_tokens")):
            assert torch.equal(out[name], a[name]), name
    assert torch.equal(out["language_model.model.layers.5.mlp.up_proj.weight"],
                       b["language_model.model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(out["language_model.model.norm.weight"], b["language_model.model.norm.weight"])
    model = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    assert model.config.text_config.num_hidden_layers == 6
