"""The output tokenizer: which model's tokenizer files the merge writes, and its chat template.

Works from the files only (tokenizer_config.json, chat_template.jinja); nothing here loads a
tokenizer, so it runs in the same place as the rest of the output's side files.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from merge_core import chat_templates
from merge_core.errors import MergeError
from merge_core.sources import ModelSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
# A multimodal model's processor settings (image preprocessing), which AutoProcessor needs.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def tokenizer_files(tok_dir: Path, *, chat_template: str | None, sources: Mapping[str, ModelSource],
                    rebuilt: Mapping[str, str] | None = None) -> dict[str, Path | str]:
    """Output file name -> source path or text: ``tok_dir``'s tokenizer (or the ``rebuilt``
    one's files, a union or added tokens), with ``chat_template``.

    ``chat_template`` is the recipe's value (a name, "auto" or a Jinja string); None keeps
    the tokenizer's own template.
    """
    files: dict[str, Path | str] = {}
    for name in PROCESSOR_FILES + (() if rebuilt else TOKENIZER_FILES):
        if (tok_dir / name).is_file():
            files[name] = tok_dir / name
    files.update(rebuilt or {})
    if chat_template is None:
        return files
    template = chat_templates.resolve(chat_template)
    if template is None:  # auto: the template most of the inputs use, as mergekit picks it
        found = [t for t in (model_chat_template(src.path) for src in sources.values()) if t]
        if not found:
            return files
        template = Counter(t.strip() for t in found).most_common(1)[0][0]
    for name in _TEMPLATE_FILES:
        files.pop(name, None)
    if "tokenizer_config.json" in files:
        current = files["tokenizer_config.json"]
        config = _read_json(current) if isinstance(current, Path) else json.loads(current)
        config.pop("chat_template", None)  # the .jinja file below is the one template
        files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    files["chat_template.jinja"] = template
    return files


def model_chat_template(path: Path) -> str | None:
    """A model folder's chat template: chat_template.jinja, else tokenizer_config.json's."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return None
    template = _read_json(config_file).get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MergeError(f"{path} is unreadable ({e}): re-download the model's tokenizer files") from e
    if not isinstance(data, dict):
        raise MergeError(f"{path} is not a JSON object: re-download the model's tokenizer files")
    return data
