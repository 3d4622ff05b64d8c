"""Chat templates, rendered exactly as stock lm-eval renders them.

``lm_eval --apply_chat_template --fewshot_as_multiturn`` turns a task prompt into chat turns
(:meth:`benchmarks_ptbr.suite.Task.messages`) and renders them with the tokenizer's own
template, with the generation prompt added; a template that rejects a system turn is
retried without it, as lm-eval does. Then the answer follows with no delimiter, and a
rendered prompt that already starts with the BOS text is encoded without special tokens.
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
            f"{model} has no chat template (tokenizer_config.json has no 'chat_template'); "
            "score it without --chat-template, or use its instruct/chat variant")


def render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The prompt string lm-eval's HFLM.apply_chat_template produces for ``messages``."""
    import jinja2

    kwargs = {"tokenize": False, "add_generation_prompt": True, "continue_final_message": False}
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except jinja2.exceptions.TemplateError:
        # Templates without a system role raise; lm-eval then drops the system turn.
        return tokenizer.apply_chat_template(
            [m for m in messages if m["role"] != "system"], **kwargs)


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
