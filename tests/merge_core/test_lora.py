"""LoRA adapters as merge sources (``base+adapter`` and adapter folders), against PEFT's
merge_and_unload and mergekit 0.1.5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from merge_core.io import load_state
from merge_core.materialize import merge_to_disk
from merge_core.recipe import Recipe
from merge_core.sources import SourceError, resolve_model

peft = pytest.importorskip("peft")

TOLERANCE = 1e-5


def _adapter(base: Path, out: Path, *, seed: int = 0, **lora) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = peft.LoraConfig(init_lora_weights=False, **lora)   # random A and B: a non-zero delta
    peft.get_peft_model(model, config).save_pretrained(str(out))
    return out


def _merged_by_peft(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


ADAPTERS = {
    "llama_attn_mlp_head": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                          modules_to_save=["lm_head"])),
    "llama_embedding_rslora_patterns": ("llama", dict(r=4, lora_alpha=16, use_rslora=True,
                                                      target_modules=["embed_tokens", "o_proj", "up_proj"],
                                                      rank_pattern={"up_proj": 2}, alpha_pattern={"o_proj": 3})),
    "gpt2_fan_in_fan_out_lora_bias": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                   fan_in_fan_out=True, lora_bias=True)),
    "qwen3": ("qwen3", dict(r=2, lora_alpha=4, target_modules=["k_proj", "gate_proj"])),
}


def _loadable_names(folder: Path) -> set[str]:
    return set(load_state(folder))


@pytest.mark.parametrize("case", sorted(ADAPTERS))
@pytest.mark.parametrize("style", ["plus", "folder"])
def test_adapter_source_equals_peft_merge_and_unload(case, style, family_zoo, tmp_path):
    family, lora = ADAPTERS[case]
    base = family_zoo(family)["base"]
    adapter = _adapter(base, tmp_path / "adapter", **lora)
    ref = f"{base}+{adapter}" if style == "plus" else str(adapter)
    recipe = Recipe.from_dict({"models": [{"model": ref}], "merge_method": "passthrough", "dtype": "float32"})
    merge_to_disk(recipe, tmp_path / "out", device="cpu", progress=False)
    ours = load_state(tmp_path / "out")
    theirs = _merged_by_peft(base, adapter)
    plain = load_state(base)
    changed = 0
    for name, got in ours.items():
        ref_t = theirs[name]
        scale = ref_t.abs().max().item() or 1.0
        assert (got.double() - ref_t.double()).abs().max().item() / scale <= TOLERANCE, name
        changed += not torch.equal(got, plain[name])
    assert changed >= 4                       # the adapter did change the model


def test_plus_source_in_a_merge_matches_mergekit(family_zoo, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    zoo = family_zoo("llama")
    adapter = _adapter(zoo["base"], tmp_path / "adapter", **ADAPTERS["llama_attn_mlp_head"][1])
    text = f"""
models:
  - {{model: "{zoo['base']}+{adapter}", parameters: {{weight: 0.6, density: 0.5}}}}
  - {{model: "{zoo['ft_a']}", parameters: {{weight: 0.4, density: 0.7}}}}
merge_method: ties
base_model: "{zoo['base']}"
dtype: float32
"""
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "theirs"),
              options=MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False,
                                   lora_merge_cache=str(tmp_path / "cache")))
    merge_to_disk(Recipe.from_yaml(text), tmp_path / "ours", device="cpu", progress=False)
    theirs, ours = load_state(tmp_path / "theirs"), load_state(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    for name, ref_t in theirs.items():
        scale = ref_t.abs().max().item() or 1.0
        assert (ours[name].double() - ref_t.double()).abs().max().item() / scale <= TOLERANCE, name


def test_adapter_source_resolves_to_its_base(family_zoo, tmp_path):
    zoo = family_zoo("llama")
    adapter = _adapter(zoo["base"], tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["q_proj"])
    src = resolve_model(str(adapter))
    assert src.path == zoo["base"].resolve() and src.adapter == adapter.resolve()
    assert src.config["model_type"] == "llama"
    plus = resolve_model(f"{zoo['base']}+{adapter}")
    assert plus.adapter == adapter.resolve() and plus.ref == f"{zoo['base']}+{adapter}"


@pytest.mark.parametrize("mutate, message", [
    (lambda cfg: cfg.update(use_dora=True), "DoRA adapter"),
    (lambda cfg: cfg.update(peft_type="IA3"), "IA3 adapter: only LoRA"),
    (lambda cfg: cfg.pop("base_model_name_or_path"), "names no base_model_name_or_path"),
])
def test_unsupported_adapters_are_refused_in_one_line(mutate, message, family_zoo, tmp_path):
    zoo = family_zoo("llama")
    adapter = _adapter(zoo["base"], tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    mutate(cfg)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match=message) as err:
        resolve_model(str(adapter))
    assert "\n" not in str(err.value)


def test_missing_adapter_folder_names_it(family_zoo, tmp_path):
    zoo = family_zoo("llama")
    with pytest.raises(SourceError, match="not found") as err:
        resolve_model(f"{zoo['base']}+{tmp_path / 'nope'}")
    assert "\n" not in str(err.value)
    with pytest.raises(SourceError, match="one '\\+'"):
        resolve_model(f"{zoo['base']}+a+b")


def test_adapter_for_another_base_is_refused(family_zoo, tmp_path):
    llama, gpt2 = family_zoo("llama"), family_zoo("gpt2")
    adapter = _adapter(llama["base"], tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["q_proj"])
    recipe = Recipe.from_dict({"models": [{"model": f"{gpt2['base']}+{adapter}"}], "merge_method": "passthrough"})
    with pytest.raises(Exception, match="which its base model lacks"):
        merge_to_disk(recipe, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_provenance_lists_the_adapter_with_its_hashes(family_zoo, tmp_path):
    from merge_core.provenance import file_sha256

    zoo = family_zoo("llama")
    adapter = _adapter(zoo["base"], tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["q_proj"])
    recipe = Recipe.from_dict({"models": [{"model": f"{zoo['base']}+{adapter}", "parameters": {"weight": 0.5}},
                                          {"model": str(zoo["ft_a"]), "parameters": {"weight": 0.5}}],
                               "merge_method": "task_arithmetic", "base_model": str(zoo["base"])})
    merge_to_disk(recipe, tmp_path / "out", device="cpu", progress=False)
    manifest = next(json.loads(p.read_text()) for p in (tmp_path / "out").glob("*.json")
                    if "sources" in json.loads(p.read_text()))
    refs = [s["ref"] for s in manifest["sources"]]
    assert str(zoo["base"]) in refs and f"{zoo['base']}+{adapter}" in refs   # not folded into the base
    entry = next(s for s in manifest["sources"] if s["ref"].endswith(str(adapter)))
    hashes = {f["name"]: f["sha256"] for f in entry["adapter"]["files"]}
    assert hashes["adapter_model.safetensors"] == file_sha256(adapter / "adapter_model.safetensors")
