"""Chat templates, rendered as stock lm-eval renders them, or as the Leaderboard's harness.

Stock: ``lm_eval --apply_chat_template --fewshot_as_multiturn`` turns a task prompt into chat
turns (:meth:`benchmarks_ptbr.suite.Task.messages`) and renders them with the tokenizer's own
template, with the generation prompt added; a template that rejects a system turn is
retried without it, as lm-eval does. Then the answer follows with no delimiter, and a
rendered prompt that already starts with the BOS text is encoded without special tokens.

Leaderboard (eduagarcia/lm-evaluation-harness-pt @ ca07215, ``lm_eval/models/huggingface.py``:
``_create_tokenizer``, ``_apply_chat_template``): chat is used when the tokenizer has a
template and one of three turn layouts renders; every text is stripped; the description is a
system turn, else an assistant turn, else it opens the first user turn (joined to the first
shot's question by a blank line); the rendered text is encoded without special tokens
(:func:`leaderboard_chat_type`, :func:`leaderboard_turns`).
"""

from __future__ import annotations

from typing import Any

from merge_core.errors import BrmergeError


class ChatTemplateError(BrmergeError):
    """A chat template was asked for, and the tokenizer has none (or it fails)."""


def require_chat_template(tokenizer: Any, *, model: str = "the model") -> None:
    """One-line error when ``tokenizer`` has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{model} has no chat template (tokenizer_config.json has no 'chat_template'), and "
            "chat rendering was asked for (--chat-template); pass --no-chat-template, or use "
            "its instruct/chat variant")


def render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt string lm-eval's HFLM.apply_chat_template produces for ``messages``."""
    import jinja2

    # transformers' own rendering, in a worker with time and memory limits (a template is code)
    from merge_core.template_sandbox import apply_chat_template

    kwargs = {"tokenize": False, "add_generation_prompt": True, "continue_final_message": False}
    try:
        return apply_chat_template(tokenizer, messages, **kwargs)
    except jinja2.exceptions.TemplateError:
        # Templates without a system role raise; lm-eval then drops the system turn.
        return apply_chat_template(tokenizer, [m for m in messages if m["role"] != "system"], **kwargs)


def bos_text(tokenizer: Any) -> str | None:
    """The text lm-eval's HFLM checks a prompt against before adding special tokens: the
    decoded prefix token (BOS, else EOS)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return None if token is None else tokenizer.decode(token)


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` as lm-eval's HFLM.tok_encode gives them: the tokenizer's default
    special tokens, except none for a text that already starts with the BOS text (a rendered
    chat template usually does), so BOS is never doubled."""
    prefix = bos_text(tokenizer)
    starts = [prefix is not None and t.startswith(prefix) for t in texts]
    out: list[list[int] | None] = [None] * len(texts)
    for flag in (False, True):
        chosen = [i for i, s in enumerate(starts) if s == flag]
        if not chosen:
            continue
        kwargs = {"add_special_tokens": False} if flag else {}
        ids = tokenizer([texts[i] for i in chosen], **kwargs)["input_ids"]
        for i, row in zip(chosen, ids):
            out[i] = list(row)
    return out  # type: ignore[return-value]


# The harness's turn layouts, in the order it tries them.
CHAT_TYPES = ("system_user_assistant", "assistant_user", "user_assistant")


def leaderboard_turns(description: str, shots: list[tuple[str, str]], example: str, *,
                      chat_type: str) -> list[dict[str, str]]:
    """The turns the harness's ``_apply_chat_template`` builds for ``chat_type``."""
    turns: list[dict[str, str]] = []
    if description:
        role = {"assistant_user": "assistant", "user_assistant": "user"}.get(chat_type, "system")
        turns.append({"role": role, "content": description.strip()})
    for i, (question, answer) in enumerate(shots):
        if i == 0 and chat_type == "user_assistant" and len(turns) == 1:
            turns[0]["content"] += "\n\n" + question.strip()  # description opens the first turn
        else:
            turns.append({"role": "user", "content": question.strip()})
        turns.append({"role": "assistant", "content": answer.strip()})
    turns.append({"role": "user", "content": example.strip()})
    return turns


def render_turns(tokenizer: Any, turns: list[dict[str, str]]) -> str:
    """``apply_chat_template(turns, add_generation_prompt=True, tokenize=False)``, the
    harness's call (no ``continue_final_message``)."""
    from merge_core.template_sandbox import apply_chat_template

    return apply_chat_template(tokenizer, turns, add_generation_prompt=True)


def leaderboard_chat_type(tokenizer: Any) -> str | None:
    """The first layout of :data:`CHAT_TYPES` the template renders for the harness's probe
    (description, two shots, question, all "test"); None without a template or when none
    renders (the harness then scores without chat)."""
    import jinja2

    from merge_core.template_sandbox import TemplateLimitError

    if getattr(tokenizer, "chat_template", None) is None:
        return None
    for chat_type in CHAT_TYPES:
        turns = leaderboard_turns("test", [("test", "test"), ("test", "test")], "test",
                                  chat_type=chat_type)
        try:
            render_turns(tokenizer, turns)
        except (jinja2.exceptions.TemplateError, TemplateLimitError):
            continue  # the harness catches any exception here and tries the next layout
        return chat_type
    return None
