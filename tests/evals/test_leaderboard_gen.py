"""The leaderboard suite scored by generation with a chat template, against stock
``lm_eval --apply_chat_template --fewshot_as_multiturn`` on the shipped task YAML."""

from __future__ import annotations

import torch

from benchmarks_ptbr.suite import load_suite
from evals.generate import evaluate_generation
from tests.evals.parity import lm_eval_run


def test_leaderboard_generation_matches_lm_eval_item_by_item(chat_tokenizer, data_dir):
    from transformers import LlamaForCausalLM

    from search.demo.tiny import llama_config

    tok = chat_tokenizer("mistral")
    config = llama_config(vocab_size=len(tok))
    config.max_position_embeddings = 4096
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, None
    torch.manual_seed(5)
    model = LlamaForCausalLM(config).eval()
    suite = load_suite(split="leaderboard", source="leaderboard", data_dir=data_dir, limit=2)
    ours = evaluate_generation(model, tok, suite, batch_size=1, chat_template=True)
    assert ours.meta["indices"] == {t.name: list(t.indices) for t in suite.tasks}
    theirs = lm_eval_run(model, tok, suite, metadata={"data_dir": str(data_dir)},
                         chat_template=True, batch_size=1)
    for name, metrics in ours.tasks.items():
        by_id = {i.id: i for i in ours.items if i.task == name}
        assert len(theirs["samples"][name]) == metrics.n == 2
        for sample in theirs["samples"][name]:
            mine = by_id[sample["doc"]["id"]]
            assert sample["filtered_resps"][0] == mine.output  # the same generated text
            assert sample["acc"] == float(mine.correct)
        assert theirs["results"][name]["acc,none"] == metrics.acc
