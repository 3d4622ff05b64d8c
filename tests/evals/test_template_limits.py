"""Chat templates are code: rendering is bounded in time, memory and output, and renders
exactly what transformers' own ``apply_chat_template`` renders."""

from __future__ import annotations

import copy
import time

import jinja2
import pytest

from evals import chat
from merge_core import template_sandbox
from merge_core.chat_templates import NAMED
from merge_core.template_sandbox import TemplateLimitError, apply_chat_template

CONVERSATIONS = [
    [{"role": "user", "content": "Qual é a capital do Brasil?"}],
    [{"role": "system", "content": "Responda com uma letra."},
     {"role": "user", "content": "A) 1 B) 2"}, {"role": "assistant", "content": "B"},
     {"role": "user", "content": "  Ç ã é  \n"}],
]


@pytest.fixture(scope="module")
def shared_tok(chat_tokenizer):
    """One tokenizer (so one worker) for the tests that only change the template."""
    return copy.deepcopy(chat_tokenizer("mistral"))


def _with_template(tok, template: str):
    tok.chat_template = template   # the worker renders the template the tokenizer has now
    return tok


@pytest.mark.parametrize("kind", ["mistral", "gemma"])
def test_renders_as_transformers_does(chat_tokenizer, kind):
    tok = chat_tokenizer(kind)
    for messages in CONVERSATIONS:
        for gen in (True, False):
            try:
                expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            except jinja2.exceptions.TemplateError as e:   # gemma refuses a system turn
                with pytest.raises(jinja2.exceptions.TemplateError, match=str(e)[:30]):
                    apply_chat_template(tok, messages, add_generation_prompt=gen)
                continue
            assert apply_chat_template(tok, messages, add_generation_prompt=gen) == expected
        # evals.chat.render (lm-eval's rendering, with the system-turn retry) goes through the worker
        direct = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
            if kind == "mistral" else tok.apply_chat_template(
                [m for m in messages if m["role"] != "system"], tokenize=False, add_generation_prompt=True)
        assert chat.render(tok, messages) == direct


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_templates_render_as_transformers_does(shared_tok, name):
    tok = _with_template(shared_tok, NAMED[name])
    messages = CONVERSATIONS[1] if name != "mistral" else CONVERSATIONS[1][1:]
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert apply_chat_template(tok, messages, add_generation_prompt=True) == expected


def test_nested_loops_stop_at_the_time_limit(shared_tok, monkeypatch):
    # no output, so no memory: only the clock stops it
    bomb = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    tok = _with_template(shared_tok, bomb)
    monkeypatch.setattr(template_sandbox, "TIMEOUT_S", 3.0)
    start = time.monotonic()
    with pytest.raises(TemplateLimitError, match="took more than 3 s") as err:
        chat.render(tok, CONVERSATIONS[0])
    assert "\n" not in str(err.value)
    assert time.monotonic() - start < 3.0 + template_sandbox._START_TIMEOUT_S


def test_memory_bomb_is_stopped(shared_tok):
    tok = _with_template(shared_tok, "{{ 'x' * 10000000000 }}{{ messages[0]['content'] }}")
    with pytest.raises(TemplateLimitError, match="more than 2 GiB of memory"):
        apply_chat_template(tok, CONVERSATIONS[0])


def test_doubling_string_is_stopped(shared_tok):
    tok = _with_template(shared_tok, "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                                         "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}")
    with pytest.raises(TemplateLimitError, match="memory"):
        apply_chat_template(tok, CONVERSATIONS[0])


def test_output_cap(shared_tok, monkeypatch):
    monkeypatch.setattr(template_sandbox, "MAX_OUTPUT_CHARS", 1000)
    tok = _with_template(shared_tok, "{% for i in range(2000) %}x{% endfor %}{{ messages[0]['content'] }}")
    with pytest.raises(TemplateLimitError, match="more than 1000"):
        apply_chat_template(tok, CONVERSATIONS[0])
    # the worker still serves after a refused render
    ok = _with_template(shared_tok, "{{ messages[0]['content'] }}")
    assert apply_chat_template(ok, CONVERSATIONS[0]) == CONVERSATIONS[0][0]["content"]
