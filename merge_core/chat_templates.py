"""The named chat templates a recipe's ``chat_template`` may give (mergekit's names).

Each renders a conversation exactly as mergekit's template of that name does (checked in
``tests/merge_core/test_tokenizers.py``); they are written here with explicit whitespace
control so what they print does not depend on the Jinja environment's trim settings.
"""

from __future__ import annotations

from merge_core.errors import RecipeError

# Why these rules: transformers renders chat templates with trim_blocks and lstrip_blocks, so a
# newline right after a block tag is dropped; every template below strips its own whitespace.
NAMED: dict[str, str] = {
    "alpaca": (
        "{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}"
        "{{- (system | last).content | trim if system else '' -}}"
        "{{- '\n\n' -}}"
        "{%- set headers = {'user': '### Instruction:\n', 'assistant': '### Response:\n', "
        "'user_context': '### Input:\n'} -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] in headers -%}"
        "{{- headers[message['role']] + (message['content'] | trim) -}}"
        "{%- if not loop.last -%}{{- '\n\n' -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
        "{{- '### Response:\n' -}}"
        "{%- endif -%}"
    ),
    "chatml": (
        "{%- for message in messages -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    ),
    "llama3": (
        "{%- for message in messages -%}"
        "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + (message['content'] | trim) + '<|eot_id|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
        "{%- endif -%}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
        "{{- bos_token -}}"
        "{%- for message in turns -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{- raise_exception('After the optional system message, conversation roles must "
        "alternate user/assistant/user/assistant/...') -}}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if loop.first and system is defined -%}"
        "{{- ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' -}}"
        "{%- else -%}{{- ' [INST] ' + message['content'] + ' [/INST]' -}}{%- endif -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        "{{- ' ' + message['content'] + eos_token -}}"
        "{%- else -%}"
        "{{- raise_exception('Only user and assistant roles are supported, with the exception "
        "of an initial optional system message!') -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
    ),
}

# mergekit's rule for telling a name from a literal template.
_MAX_NAME = 256
_MIN_LITERAL = 20


def resolve(value: str) -> str | None:
    """The template text for ``value`` ("auto" -> None: chosen from the inputs later).

    Raises RecipeError (one line with the fix) when ``value`` is neither a known name nor a template.
    """
    if value == "auto":
        return None
    if len(value) < _MAX_NAME and "\n" not in value and "{" not in value:
        if value in NAMED:
            return NAMED[value]
        raise RecipeError(f"chat_template {value!r} is not a known template name: use one of "
                         f"{', '.join(sorted(NAMED))}, auto, or a Jinja template string")
    if len(value) < _MIN_LITERAL or "{" not in value:
        raise RecipeError(f"chat_template {value[:40]!r} is not a Jinja template: give a template "
                         f"string with {{% %}}/{{{{ }}}} tags, or one of {', '.join(sorted(NAMED))}, auto")
    return value
