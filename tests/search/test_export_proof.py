"""The export's proof scores the exported weights exactly as the search worker scored them."""

from __future__ import annotations

import torch

from evals.harness import Evaluator
from merge_core.materialize import merge_to_disk
from merge_core.recipe import Recipe
from merge_core.resident import ResidentModels
from search.demo.tiny import llama_config, make_llama, make_tokenizer
from merge_core.resident import as_live_module
from search.export import _threads


def test_export_rescoring_equals_the_resident_trial_bit_for_bit(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tokenizer(tmp_path / "tok", vocab_size=512)
    cfg = llama_config(vocab_size=512, hidden=64, layers=4)
    base = make_llama(tmp_path / "base", config=cfg, tokenizer_dir=tmp_path / "tok")
    a = make_llama(tmp_path / "a", seed=1, like=base, tokenizer_dir=tmp_path / "tok")
    b = make_llama(tmp_path / "b", seed=2, like=base, tokenizer_dir=tmp_path / "tok")
    evaluator = Evaluator.for_suite(AutoTokenizer.from_pretrained(str(tmp_path / "tok")), split="dev",
                                    source="sample", limit=6, num_fewshot=0)
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(a), "parameters": {"weight": 0.6, "density": 0.5}},
        {"model": str(b), "parameters": {"weight": 0.4, "density": 0.5}}]})
    resident = ResidentModels(str(base), [str(a), str(b)], device="cpu")
    live = resident.load_module()
    resident.materialize(recipe, live)
    before = torch.get_num_threads()
    torch.set_num_threads(1)             # a search worker with one thread, as the demo runs them
    try:
        trial = evaluator.evaluate(live)
    finally:
        torch.set_num_threads(before)

    merge_to_disk(recipe, tmp_path / "out", device="cpu", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    torch.set_num_threads(2)             # the export's own process may have more
    with _threads(1):                    # the trial's recorded thread count
        proof = evaluator.evaluate(as_live_module(loaded, torch.device("cpu")))
    torch.set_num_threads(before)
    assert [(i.pred, i.gold_prob) for i in proof.items] == [(i.pred, i.gold_prob) for i in trial.items]
