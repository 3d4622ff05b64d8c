"""The export's proof rebuilds the live model in the trial's dtype and scores as the trial did."""

from __future__ import annotations

import torch

from evals.harness import Evaluator
from merge_core.materialize import merge_to_disk
from merge_core.recipe import Recipe
from merge_core.resident import ResidentModels, as_live_module
from search.demo.tiny import llama_config, make_llama, make_tokenizer


def test_bfloat16_trial_is_reproduced_by_the_export_in_bfloat16(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tokenizer(tmp_path / "tok", vocab_size=512)
    cfg = llama_config(vocab_size=512, hidden=64, layers=2)
    base = make_llama(tmp_path / "base", config=cfg, tokenizer_dir=tmp_path / "tok")
    a = make_llama(tmp_path / "a", seed=1, like=base, tokenizer_dir=tmp_path / "tok")
    evaluator = Evaluator.for_suite(AutoTokenizer.from_pretrained(str(tmp_path / "tok")), split="dev",
                                    source="sample", limit=4, num_fewshot=0)
    recipe = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": str(base),
                               "models": [{"model": str(a), "parameters": {"weight": 0.7}}]})
    resident = ResidentModels(str(base), [str(a)], device="cpu")
    live = resident.load_module(dtype=torch.bfloat16)
    resident.materialize(recipe, live)
    trial = evaluator.evaluate(live)

    merge_to_disk(recipe, tmp_path / "out", device="cpu", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    proof = as_live_module(loaded, torch.device("cpu"), dtype=torch.bfloat16)
    assert next(proof.parameters()).dtype == torch.bfloat16
    got = evaluator.evaluate(proof)
    assert [(i.pred, i.gold_prob) for i in got.items] == [(i.pred, i.gold_prob) for i in trial.items]
    f32 = evaluator.evaluate(as_live_module(
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32), torch.device("cpu")))
    assert [i.gold_prob for i in f32.items] != [i.gold_prob for i in trial.items]   # the dtype matters
