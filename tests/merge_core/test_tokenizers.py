"""The output tokenizer: tokenizer_source validation and chat templates, against mergekit."""

from __future__ import annotations

import importlib.resources

import pytest

from merge_core import chat_templates
from merge_core.errors import RecipeError
from merge_core.materialize import merge_to_disk
from merge_core.recipe import Recipe

CONVERSATIONS = [
    [{"role": "user", "content": " Olá "}, {"role": "assistant", "content": "Oi!"},
     {"role": "user", "content": "Tudo bem?"}],
    [{"role": "system", "content": "Seja breve."}, {"role": "user", "content": "Qual a capital?"},
     {"role": "assistant", "content": " Brasília "}],
    [{"role": "user", "content": "a"}, {"role": "user_context", "content": "ctx"},
     {"role": "system", "content": " tarde "}, {"role": "assistant", "content": "b"}],
]
LITERAL = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}{% endfor %}"


def _render(tok, template: str | None = None) -> list[str]:
    from jinja2 import TemplateError

    out = []
    for conversation in CONVERSATIONS:
        for prompt in (False, True):
            try:
                out.append(tok.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                                   add_generation_prompt=prompt))
            except TemplateError as e:  # a template refusing a conversation must refuse it alike
                out.append(f"refused: {e}")
    return out


@pytest.mark.parametrize("name", sorted(chat_templates.NAMED))
def test_named_templates_render_like_mergekits(name, tiny_zoo):
    from mergekit._data import chat_templates as theirs
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_zoo["tokenizer"]))
    reference = importlib.resources.files(theirs).joinpath(name + ".jinja").read_text()
    assert _render(tok, chat_templates.NAMED[name]) == _render(tok, reference)


def _linear(zoo, **extra) -> dict:
    return {"models": [{"model": str(zoo["ft_a"]), "parameters": {"weight": 0.5}},
                       {"model": str(zoo["ft_b"]), "parameters": {"weight": 0.5}}],
            "merge_method": "linear", "dtype": "float32", **extra}


@pytest.mark.parametrize("template", ["chatml", "llama3", LITERAL])
def test_chat_template_written_as_mergekit_writes_it(template, tiny_zoo, tmp_path):
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoTokenizer

    data = _linear(tiny_zoo, chat_template=template)
    run_merge(MergeConfiguration.model_validate(data), str(tmp_path / "theirs"),
              options=MergeOptions(copy_tokenizer=True, quiet=True, write_model_card=False))
    merge_to_disk(Recipe.from_yaml(yaml.safe_dump(data)), tmp_path / "ours", device="cpu", progress=False)
    ours = AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "theirs"))
    assert ours.chat_template
    assert _render(ours) == _render(theirs)
    assert ours.get_vocab() == theirs.get_vocab()


def test_auto_takes_the_inputs_most_common_template(tiny_zoo, tmp_path):
    from transformers import AutoTokenizer

    models = {}
    for key, template in (("ft_a", LITERAL), ("ft_b", LITERAL), ("ft_c", chat_templates.NAMED["chatml"])):
        folder = tmp_path / key
        folder.mkdir()
        for f in tiny_zoo[key].iterdir():
            (folder / f.name).symlink_to(f)
        (folder / "chat_template.jinja").write_text(template)
        models[key] = folder
    data = {"models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in models.values()],
            "merge_method": "linear", "chat_template": "auto"}
    merge_to_disk(Recipe.from_dict(data), tmp_path / "out", device="cpu", progress=False)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert tok.chat_template.strip() == LITERAL


def test_without_chat_template_the_source_tokenizer_files_are_copied(tiny_zoo, tmp_path):
    merge_to_disk(Recipe.from_dict(_linear(tiny_zoo)), tmp_path / "out", device="cpu", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tiny_zoo["ft_a"] / name).read_bytes()


@pytest.mark.parametrize("value, message", [
    ("chatmll", "not a known template name"),
    ("{{ x }}", "not a Jinja template"),
    (42, "must be a template name or a Jinja string"),
])
def test_bad_chat_template_is_one_line_at_recipe_time(value, message, tiny_zoo):
    with pytest.raises(RecipeError, match=message) as err:
        Recipe.from_dict(_linear(tiny_zoo, chat_template=value))
    assert "\n" not in str(err.value)


def test_tokenizer_source_outside_the_recipe_is_refused_at_recipe_time(tiny_zoo):
    with pytest.raises(RecipeError, match="tokenizer_source 'org/other' is not a model of this recipe") as err:
        Recipe.from_dict(_linear(tiny_zoo, tokenizer_source="org/other"))
    assert "\n" not in str(err.value)


def test_tokenizer_source_model_is_used(tiny_zoo, tmp_path):
    data = _linear(tiny_zoo, tokenizer_source=str(tiny_zoo["ft_b"]))
    merge_to_disk(Recipe.from_dict(data), tmp_path / "out", device="cpu", progress=False)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tiny_zoo["ft_b"] / "tokenizer.json").read_bytes()
