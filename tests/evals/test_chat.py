"""Chat templates: the resident evaluator against stock ``lm_eval --apply_chat_template
--fewshot_as_multiturn``, item by item, and the one-line error without a template."""

from __future__ import annotations

import pytest
import torch

from benchmarks_ptbr.suite import load_suite
from evals import chat
from evals.harness import Evaluator, task_contexts
from tests.evals.parity import check_parity, lm_eval_run


def _llama(vocab: int) -> torch.nn.Module:
    from search.demo.tiny import llama_config

    from transformers import LlamaForCausalLM

    config = llama_config(vocab_size=vocab)
    config.max_position_embeddings = 4096
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, None
    torch.manual_seed(3)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("kind", ["mistral", "gemma"])
def test_chat_template_matches_lm_eval_item_by_item(chat_tokenizer, kind):
    tok = chat_tokenizer(kind)
    model = _llama(len(tok))
    suite = load_suite(split="dev", source="sample", domains=["legal", "enem"], limit=3)
    evaluator = Evaluator(tok, suite, chat_template=True)
    task, item, context = task_contexts(suite, tok, chat_template=True)[0]
    # Shots are turns: three answered user/assistant pairs, then the question.
    assert [m["role"] for m in task.messages(item)] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    if kind == "mistral":
        assert context.startswith("<s>[SYSTEM_PROMPT]As perguntas")
        assert context.count("</s>") == 3 and context.endswith("Resposta correta:[/INST]")
    else:  # no system role: lm-eval drops the description, and so do we
        assert "As perguntas" not in context and context.endswith("<start_of_turn>model\n")
    request = evaluator.requests[0]
    assert request.prefix[0] == tok.bos_token_id != request.prefix[1]  # one BOS, not two
    ours = evaluator.evaluate(model)
    assert ours.meta["chat_template"] is True
    plain = Evaluator(tok, suite).evaluate(model)
    assert [i.gold_prob for i in ours.items] != [i.gold_prob for i in plain.items]
    check_parity(ours, lm_eval_run(model, tok, suite, metadata={}, chat_template=True))


def test_no_chat_template_is_a_one_line_error(mistral_tokenizer):
    tok = mistral_tokenizer("mistral_instruct_tokenizer_240323.model.v3")
    suite = load_suite(split="dev", source="sample", domains=["legal"], limit=2)
    with pytest.raises(chat.ChatTemplateError, match=r"has no chat template .*without --chat-template") as err:
        Evaluator(tok, suite, chat_template=True)
    assert "\n" not in str(err.value)
