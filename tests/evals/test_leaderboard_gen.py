"""The leaderboard suite scored by generation, against the Leaderboard's harness logic
(eduagarcia/lm-evaluation-harness-pt @ ca07215, ``lm_eval/models/huggingface.py``
``generate_until``; the bot's model_args) written down in tests/evals/test_chat.py and
tests/benchmarks_ptbr/test_leaderboard.py: the same prompts, budget, generated text, cleaned
text and extracted letter, item by item, on a tiny model."""

from __future__ import annotations

import pytest
import torch

from benchmarks_ptbr.leaderboard import normalized
from benchmarks_ptbr.suite import load_suite
from evals import chat
from evals.generate import evaluate_generation
from tests.benchmarks_ptbr.test_leaderboard import THEIR_PATTERNS, _their_filters
from tests.evals.test_chat import CHATML, _ctx, their_chat_type, their_context_ids


def _model(vocab: int, positions: int) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    from search.demo.tiny import llama_config

    config = llama_config(vocab_size=vocab)
    config.max_position_embeddings = positions
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, None
    torch.manual_seed(5)
    return LlamaForCausalLM(config).eval()


def _their_run(model, tok, suite, *, max_length, max_gen_toks, strip_think=True):
    """generate_until for one request at a time: greedy max_new_tokens, decode without special
    tokens, drop up to the last </think>, cut at until, then the task's filter chain."""
    chat_type = their_chat_type(tok)
    out = {}
    for task in suite.tasks:
        patterns = [p.replace("ABCDE", "".join(task.items[0].labels)) for p in THEIR_PATTERNS]
        for item in task.items:
            ids, _ = their_context_ids(tok, _ctx(task, item), chat_type, max_length - max_gen_toks)
            gen = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_gen_toks,
                                 do_sample=False, pad_token_id=tok.pad_token_id or 2)
            s = tok.decode(gen[0, len(ids):].tolist(), skip_special_tokens=True)
            if strip_think and "</think>" in s:
                s = s[s.rfind("</think>") + len("</think>"):].strip()
            s = s.split("\n\n")[0]
            out[item.id] = (s, _their_filters(s, patterns, "".join(item.labels)))
    return out


@pytest.mark.parametrize("era, positions, budget", [
    ("2024", 4096, (2560, 32)),   # starting_max_length 2560, the tasks' 32 tokens
    ("2025", 2100, (2100, 52)),   # a short model: max(32, 2100 - 2048) new tokens
])
def test_leaderboard_generation_equals_the_harness_item_by_item(mistral_tokenizer, data_dir,
                                                                 era, positions, budget):
    import copy

    tok = copy.deepcopy(mistral_tokenizer("mistral_instruct_tokenizer_241114.model.v7"))
    tok.chat_template = CHATML
    model = _model(len(tok), positions)
    suite = load_suite(split="leaderboard", source="leaderboard", data_dir=data_dir, limit=1)
    ours = evaluate_generation(model, tok, suite, batch_size=1, chat_template=None, era=era)
    assert ours.meta["chat_template"] is True and ours.meta["chat_type"] == "system_user_assistant"
    assert (ours.meta["max_length"], ours.meta["max_gen_toks"]) == budget
    theirs = _their_run(model, tok, suite, max_length=budget[0], max_gen_toks=budget[1],
                        strip_think=era != "2024")
    assert {i.id: (i.output, i.pred) for i in ours.items} == theirs
    for name, metrics in ours.tasks.items():
        assert metrics.n == 1
        domain = suite.task(name).domain
        assert ours.meta["normalized"][name] == pytest.approx(normalized(metrics.acc, domain))


def test_chat_is_off_without_a_template_and_forcing_it_is_one_line(mistral_tokenizer, data_dir):
    tok = mistral_tokenizer("mistral_instruct_tokenizer_240323.model.v3")
    assert getattr(tok, "chat_template", None) is None
    model = _model(len(tok), 2100)
    suite = load_suite(split="leaderboard", source="leaderboard", data_dir=data_dir,
                       domains=["legal"], limit=1)
    result = evaluate_generation(model, tok, suite, batch_size=1, chat_template=None, era="2024")
    assert result.meta["chat_template"] is False and result.meta["chat_type"] is None
    with pytest.raises(chat.ChatTemplateError, match="pass --no-chat-template") as err:
        evaluate_generation(model, tok, suite, chat_template=True)
    assert "\n" not in str(err.value)
