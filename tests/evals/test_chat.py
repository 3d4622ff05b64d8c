"""Chat templates: the resident evaluator against stock ``lm_eval --apply_chat_template
--fewshot_as_multiturn``, item by item; the leaderboard suite's rendering against the
Leaderboard's harness (its logic written down below as the spec); the one-line errors."""

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
    with pytest.raises(chat.ChatTemplateError,
                       match=r"has no chat template .*asked for \(--chat-template\); pass --no-chat-template") as err:
        Evaluator(tok, suite, chat_template=True)
    assert "\n" not in str(err.value)


# ---- the Leaderboard's harness (eduagarcia/lm-evaluation-harness-pt @ ca07215) ----------
# Templates in the shapes real models ship, built here: ChatML (Qwen-style, system role),
# Gemma's (no system role, roles must alternate starting with the user) and one that rejects a
# system turn but takes any order.
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
         "{{ raise_exception('System role not supported') }}{% endif %}"
         "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
         "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
         "{% endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
NO_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}"
             "{{ raise_exception('no system') }}{% endif %}[{{ m['role'] }}]{{ m['content'] }}"
             "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


def their_chat_history(example, fewshots, description, chat_type):
    """lm_eval/models/huggingface.py, HFLM._apply_chat_template (the turns it builds)."""
    chat_history = []
    if description:
        role = "system"
        if chat_type == "assistant_user":
            role = "assistant"
        elif chat_type == "user_assistant":
            role = "user"
        chat_history.append({"role": role, "content": description.strip()})
    for i, (q_shot, a_shot) in enumerate(fewshots):
        if i == 0 and chat_type == "user_assistant" and len(chat_history) == 1:
            chat_history[0]["content"] += "\n\n" + q_shot.strip()
            chat_history.append({"role": "assistant", "content": a_shot.strip()})
        else:
            chat_history.append({"role": "user", "content": q_shot.strip()})
            chat_history.append({"role": "assistant", "content": a_shot.strip()})
    chat_history.append({"role": "user", "content": example.strip()})
    return chat_history


def their_chat_type(tokenizer):
    """HFLM._create_tokenizer: the first layout whose probe renders, else no chat."""
    if tokenizer.chat_template is None:
        return None
    for chat_type in ["system_user_assistant", "assistant_user", "user_assistant"]:
        try:
            tokenizer.apply_chat_template(
                their_chat_history("test", [("test", "test"), ("test", "test")], "test", chat_type),
                add_generation_prompt=True, tokenize=False)
            return chat_type
        except Exception:
            continue
    return None


def their_context_ids(tokenizer, ctx, chat_type, left_truncate_len):
    """HFLM.tok_batch_encode for one request: the text (chat or _construct_text_input), shots
    dropped from the end while too long, then left truncation keeping a first special token."""
    def construct(c):
        if chat_type is not None:
            return tokenizer.apply_chat_template(
                their_chat_history(c["example"], c["fewshots"], c["description"], chat_type),
                add_generation_prompt=True, tokenize=False)
        return (c["description"] + c["fewshot_delimiter"].join(
            [s[0] + c["target_delimiter"] + str(s[1]) for s in c["fewshots"]])
            + c["fewshot_delimiter"] + c["example"])

    add_special_tokens = chat_type is None
    string = construct(ctx)
    fewshots = len(ctx["fewshots"])
    while len(tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]) > left_truncate_len:
        if fewshots - 1 < 0:
            break
        fewshots -= 1
        string = construct({**ctx, "fewshots": ctx["fewshots"][:fewshots]})
    enc = tokenizer(string, add_special_tokens=add_special_tokens, return_special_tokens_mask=True)
    ids = enc["input_ids"]
    first_special = add_special_tokens and enc["special_tokens_mask"][0] == 1
    if first_special:
        return ids[:1] + ids[1:][-left_truncate_len + 1:], fewshots
    return ids[-left_truncate_len:], fewshots


def _ctx(task, item):
    # Task.fewshot_context's ctx_data: description, (doc_to_text, answerKey) per shot, example
    from benchmarks_ptbr.prompts import format_query

    return {"description": task.description, "example": format_query(item, task.domain),
            "fewshots": [(format_query(s, task.domain), s.answer) for s in task.shots],
            "target_delimiter": " ", "fewshot_delimiter": "\n\n"}


@pytest.fixture(scope="module")
def templated(mistral_tokenizer):
    """One tokenizer per template (each has its own rendering worker: start it once)."""
    import copy

    made = {}

    def make(template):
        if template not in made:
            tok = copy.deepcopy(mistral_tokenizer("mistral_instruct_tokenizer_241114.model.v7"))
            tok.chat_template = template
            made[template] = tok
        return made[template]

    return make


@pytest.fixture(scope="module")
def lb_suite(data_dir):
    return load_suite(split="leaderboard", source="leaderboard", data_dir=data_dir, limit=3)


@pytest.mark.parametrize("template, expected", [
    (CHATML, "system_user_assistant"), (NO_SYSTEM, "assistant_user"),
    (GEMMA, "user_assistant"), (None, None)])
def test_leaderboard_chat_type_is_the_harness_choice(templated, template, expected):
    tok = templated(template)
    assert chat.leaderboard_chat_type(tok) == their_chat_type(tok) == expected


@pytest.mark.parametrize("template", [CHATML, NO_SYSTEM, GEMMA, None])
@pytest.mark.parametrize("max_ctx_len", [100000, 700, 300])
def test_leaderboard_prompts_equal_the_harness(templated, lb_suite, template, max_ctx_len):
    import jinja2

    from evals.generate import leaderboard_prompt

    tok = templated(template)
    chat_type = chat.leaderboard_chat_type(tok)
    dropped = failed = 0
    for task in lb_suite.tasks:
        for item in task.items:
            try:
                ids, shots = their_context_ids(tok, _ctx(task, item), chat_type, max_ctx_len)
            except jinja2.exceptions.TemplateError:
                # Gemma with every shot dropped: two user turns in a row; the harness fails
                with pytest.raises(chat.ChatTemplateError, match="harness fails here too"):
                    leaderboard_prompt(tok, task, item, chat_type=chat_type,
                                       max_ctx_len=max_ctx_len)
                failed += 1
                continue
            ours = leaderboard_prompt(tok, task, item, chat_type=chat_type, max_ctx_len=max_ctx_len)
            assert (ours.ids, ours.shots_used) == (list(ids), shots)
            dropped += 3 - shots
    assert (dropped + failed > 0) == (max_ctx_len < 100000)  # the small caps do drop shots
    assert failed == 0 or template == GEMMA


def test_leaderboard_chatml_system_turn_is_stripped(templated, lb_suite):
    from evals.generate import leaderboard_prompt

    tok = templated(CHATML)
    task = lb_suite.task("ptbr_oab_exams")
    text = tok.decode(leaderboard_prompt(tok, task, task.items[0], chat_type="system_user_assistant",
                                         max_ctx_len=100000).ids)
    assert '"C" ou "D".<|im_end|>' in text and "\n\n<|im_end|>" not in text
    assert text.count("<|im_start|>user") == 4 and text.endswith("<|im_start|>assistant\n")


def test_leaderboard_gemma_merges_the_description_into_the_first_user_turn(templated, lb_suite):
    from evals.generate import leaderboard_prompt

    tok = templated(GEMMA)
    task = lb_suite.task("ptbr_enem_challenge")
    text = tok.decode(leaderboard_prompt(tok, task, task.items[0], chat_type="user_assistant",
                                         max_ctx_len=100000).ids)
    assert '<start_of_turn>user\nAs perguntas a seguir' in text
    assert '"E".\n\nPergunta:\n**Urgência emocional**' in text
    assert text.count("<start_of_turn>user") == 4
