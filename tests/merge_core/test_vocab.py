"""Embedding and head rows aligned by token string: tokenizer_source and the tokenizer block,
against mergekit 0.1.5 on fine-tunes with added tokens and renamed tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from merge_core.errors import RecipeError
from merge_core.io import load_state
from merge_core.materialize import merge_to_disk
from merge_core.recipe import Recipe

mergekit = pytest.importorskip("mergekit")

TOLERANCE = 1e-5
NEW_TOKENS = ["<legal>", "<saude>", "<enem>"]


def _added_tokens_fine_tune(src: Path, out: Path, tokens: list[str], *, special: bool = False,
                            seed: int = 7) -> Path:
    """A fine-tune of ``src`` whose tokenizer gained ``tokens`` and whose embeddings were resized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    if special:
        tok.add_special_tokens({"additional_special_tokens": tokens})
    else:
        tok.add_tokens(tokens)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _renamed_token_fine_tune(src: Path, out: Path) -> Path:
    """Same vocabulary size, but the token at one id is a different string (and two ids swapped)."""
    import shutil

    shutil.copytree(src, out)
    data = json.loads((out / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    a, b = by_id[100], by_id[101]
    vocab[a], vocab[b] = 101, 100                       # two tokens trade rows
    renamed = by_id[200]
    vocab["<renomeado>"] = vocab.pop(renamed)           # a token renamed at its id
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if renamed not in (m if isinstance(m, list) else m.split(" "))]
    (out / "tokenizer.json").write_text(json.dumps(data))
    return out


@pytest.fixture(scope="module")
def vocab_zoo(tiny_zoo, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {
        "base": tiny_zoo["base"], "ft_b": tiny_zoo["ft_b"], "ft_c": tiny_zoo["ft_c"],
        "added": _added_tokens_fine_tune(tiny_zoo["ft_a"], root / "added", NEW_TOKENS),
        "special": _added_tokens_fine_tune(tiny_zoo["ft_c"], root / "special", ["<|tool|>"], special=True, seed=9),
        "renamed": _renamed_token_fine_tune(tiny_zoo["ft_b"], root / "renamed"),
        "added2": _added_tokens_fine_tune(tiny_zoo["ft_b"], root / "added2", ["<enem>", "<legal>"], seed=8),
    }


CASES = {
    "union_ties": """
models:
  - {model: "{added}", parameters: {weight: 0.6, density: 0.7}}
  - {model: "{ft_b}", parameters: {weight: 0.4, density: 0.5}}
merge_method: ties
base_model: "{base}"
tokenizer_source: union
dtype: float32
""",
    "union_linear_no_base": """
models:
  - {model: "{added}", parameters: {weight: 0.5}}
  - {model: "{ft_b}", parameters: {weight: 0.3}}
  - {model: "{ft_c}", parameters: {weight: 0.2}}
merge_method: linear
tokenizer_source: union
dtype: float32
""",
    # (one model adds tokens per union case: mergekit orders the union by a set's iteration order)
    "union_special_token": """
models:
  - {model: "{special}", parameters: {weight: 0.5, density: 0.6}}
  - {model: "{ft_b}", parameters: {weight: 0.5, density: 0.6}}
merge_method: ties
base_model: "{base}"
tokenizer_source: union
dtype: float32
""",
    "base_task_arithmetic": """
models:
  - {model: "{added}", parameters: {weight: 0.7}}
merge_method: task_arithmetic
base_model: "{base}"
tokenizer_source: base
dtype: float32
""",
    "model_source_slerp": """
models:
  - {model: "{base}"}
  - {model: "{added}"}
merge_method: slerp
base_model: "{base}"
parameters: {t: 0.4}
tokenizer_source: "{added}"
dtype: float32
""",
    # every fill rule: <saude> only in "added" (its row), <legal>/<enem> in two fine-tunes but
    # not the base (their mean), the token "renamed" lost in the base and others (the base's row)
    "model_source_every_fill_rule": """
models:
  - {model: "{added}", parameters: {weight: 0.3}}
  - {model: "{added2}", parameters: {weight: 0.3}}
  - {model: "{renamed}", parameters: {weight: 0.4}}
merge_method: task_arithmetic
base_model: "{base}"
tokenizer_source: "{added}"
dtype: float32
""",
    "union_stacked_slices": """
slices:
  - sources: [{model: "{added}", layer_range: [0, 3]}]
  - sources: [{model: "{ft_b}", layer_range: [1, 4]}]
merge_method: passthrough
tokenizer_source: union
dtype: float32
""",
    "renamed_token_linear": """
models:
  - {model: "{base}", parameters: {weight: 0.5}}
  - {model: "{renamed}", parameters: {weight: 0.5}}
merge_method: linear
base_model: "{base}"
tokenizer_source: base
dtype: float32
""",
    "block_tokens_and_padding": """
models:
  - {model: "{added}", parameters: {weight: 0.5}}
  - {model: "{ft_b}", parameters: {weight: 0.5}}
merge_method: task_arithmetic
base_model: "{base}"
tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    "<legal>": {source: "{added}", force: false}
    "<saude>": {source: {kind: zero}}
    "<enem>": {source: {kind: model_token, model: "{added}", token: "<legal>"}}
    "<s>": {source: "{added}", force: true}
    "<novo>": {source: {kind: model_token, model: "{ft_b}", token_id: 5}}
dtype: float32
""",
}


def _fill(text: str, zoo: dict[str, Path]) -> str:
    for key, path in zoo.items():
        text = text.replace("{" + key + "}", str(path))
    return text


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_mergekit(name: str, vocab_zoo, tmp_path: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    text = _fill(CASES[name], vocab_zoo)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "theirs"),
              options=MergeOptions(quiet=True, write_model_card=False))
    merge_to_disk(Recipe.from_yaml(text), tmp_path / "ours", device="cpu", progress=False)
    theirs, ours = load_state(tmp_path / "theirs"), load_state(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    for key, ref in theirs.items():
        got = ours[key]
        assert got.shape == ref.shape, key
        scale = ref.abs().max().item() or 1.0
        worst = (got.double() - ref.double()).abs().max().item() / scale
        assert worst <= TOLERANCE, f"{name} {key}: max relative difference {worst:.3g}"
    tok_ours = AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    tok_theirs = AutoTokenizer.from_pretrained(str(tmp_path / "theirs"))
    assert tok_ours.get_vocab() == tok_theirs.get_vocab()
    assert tok_ours.all_special_tokens == tok_theirs.all_special_tokens
    text_in = "Questão 3 <legal> saúde <|tool|> <enem>"
    assert tok_ours(text_in)["input_ids"] == tok_theirs(text_in)["input_ids"]
    config = AutoConfig.from_pretrained(str(tmp_path / "ours"))
    assert config.vocab_size == AutoConfig.from_pretrained(str(tmp_path / "theirs")).vocab_size
    assert config.vocab_size == ours["model.embed_tokens.weight"].shape[0]
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"))


def test_added_token_rows_follow_the_fill_rules(vocab_zoo, tmp_path):
    text = _fill(CASES["union_ties"].replace("ties", "task_arithmetic").replace(", density: 0.7", "")
                 .replace(", density: 0.5", ""), vocab_zoo)
    merge_to_disk(Recipe.from_yaml(text), tmp_path / "out", device="cpu", progress=False)
    out, added, base = (load_state(p) for p in (tmp_path / "out", vocab_zoo["added"], vocab_zoo["base"]))
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(str(tmp_path / "out")).get_vocab()
    src_vocab = AutoTokenizer.from_pretrained(str(vocab_zoo["added"])).get_vocab()
    for token in NEW_TOKENS:
        # only "added" has it: every model's row is added's, so the merge gives added's row back
        torch.testing.assert_close(out["model.embed_tokens.weight"][vocab[token]],
                                   added["model.embed_tokens.weight"][src_vocab[token]])
    assert out["model.embed_tokens.weight"].shape[0] == len(vocab) == 384 + len(NEW_TOKENS)


def test_renamed_token_is_matched_by_string_not_id(vocab_zoo, tmp_path):
    text = _fill(CASES["renamed_token_linear"], vocab_zoo)
    merge_to_disk(Recipe.from_yaml(text), tmp_path / "out", device="cpu", progress=False)
    from transformers import AutoTokenizer

    out, base, ren = (load_state(p) for p in (tmp_path / "out", vocab_zoo["base"], vocab_zoo["renamed"]))
    base_vocab = AutoTokenizer.from_pretrained(str(vocab_zoo["base"])).get_vocab()
    ren_vocab = AutoTokenizer.from_pretrained(str(vocab_zoo["renamed"])).get_vocab()
    token = next(t for t, i in base_vocab.items() if i == 100)
    expected = (base["model.embed_tokens.weight"][100] + ren["model.embed_tokens.weight"][ren_vocab[token]]) / 2
    torch.testing.assert_close(out["model.embed_tokens.weight"][100], expected)
    assert ren_vocab[token] == 101


@pytest.mark.parametrize("block, message", [
    ({"source": "nowhere"}, "tokenizer.source 'nowhere' is not a model of this recipe"),
    ({"source": "union", "pad_to_multiple_of": 0}, "pad_to_multiple_of must be a positive whole number"),
    ({"tokens": {"<x>": {"source": {"kind": "model_token", "model": "m"}}}}, "exactly one of token, token_id"),
    ({"tokens": {"<x>": {"source": {"kind": "other"}}}}, "must be a model, {kind: zero}"),
    ({"tokens": {"<x>": {"source": "elsewhere"}}}, "model 'elsewhere' is not a model of this recipe"),
    ({"sauce": "union"}, "tokenizer.sauce is not a tokenizer setting"),
])
def test_bad_tokenizer_block_is_one_line_at_recipe_time(block, message, tiny_zoo):
    data = {"models": [{"model": str(tiny_zoo["ft_a"]), "parameters": {"weight": 1.0}}],
            "merge_method": "linear", "tokenizer": block}
    with pytest.raises(RecipeError, match=message.replace("{", r"\{").replace("(", r"\(")) as err:
        Recipe.from_dict(data)
    assert "\n" not in str(err.value)


def test_tokenizer_source_and_block_together_are_refused(tiny_zoo):
    with pytest.raises(RecipeError, match="not both"):
        Recipe.from_dict({"models": [{"model": str(tiny_zoo["ft_a"])}], "merge_method": "linear",
                          "tokenizer_source": "base", "tokenizer": {"source": "union"}})


def test_without_tokenizer_source_a_resized_fine_tune_is_refused_with_the_fix(vocab_zoo, tmp_path):
    from merge_core.checks import IncompatibleModelsError

    text = _fill(CASES["base_task_arithmetic"], vocab_zoo).replace("tokenizer_source: base\n", "")
    with pytest.raises(IncompatibleModelsError, match="set tokenizer_source"):
        merge_to_disk(Recipe.from_yaml(text), tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_row_source_lacking_the_token_is_refused_before_the_merge(vocab_zoo, tmp_path):
    text = _fill(CASES["block_tokens_and_padding"], vocab_zoo).replace(
        f'"<legal>": {{source: "{vocab_zoo["added"]}"', f'"<legal>": {{source: "{vocab_zoo["ft_b"]}"')
    with pytest.raises(RecipeError, match="has no token '<legal>'"):
        merge_to_disk(Recipe.from_yaml(text), tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def test_resident_merges_refuse_vocabulary_alignment(tiny_zoo):
    from merge_core.errors import MergeError
    from merge_core.resident import ResidentModels

    resident = ResidentModels(str(tiny_zoo["base"]), [str(tiny_zoo["ft_a"])], device="cpu")
    recipe = Recipe.from_dict({"models": [{"model": str(tiny_zoo["ft_a"]), "parameters": {"weight": 1.0}}],
                               "merge_method": "task_arithmetic", "base_model": str(tiny_zoo["base"]),
                               "tokenizer_source": "base"})
    with pytest.raises(MergeError, match="drop tokenizer_source"):
        resident.plan(recipe)


def test_tokenizer_settings_round_trip_through_yaml(vocab_zoo):
    recipe = Recipe.from_yaml(_fill(CASES["block_tokens_and_padding"], vocab_zoo))
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again == recipe and again.digest() == recipe.digest()
    assert again.vocabulary_source() == "union"
    assert again.tokenizer["tokens"]["<saude>"]["source"]["kind"] == "zero"
    other = Recipe.from_yaml(_fill(CASES["block_tokens_and_padding"], vocab_zoo).replace("64", "32"))
    assert other.digest() != recipe.digest()


def test_tied_base_with_a_resized_fine_tune_that_saved_its_head_matches_mergekit(tiny_zoo, tmp_path):
    """The head's missing rows are filled from the models' heads (a tied model's embedding),
    the embedding's from their embeddings: fills belong to the output tensor."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file, save_file

    from tests.merge_core.families import make_family

    zoo = make_family("llama", tmp_path, tokenizer_dir=tiny_zoo["tokenizer"], fine_tunes=2, tie=True)
    ft = _added_tokens_fine_tune(zoo["ft_a"], tmp_path / "added", NEW_TOKENS)
    state = load_file(ft / "model.safetensors")
    assert "lm_head.weight" not in state
    embed = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = embed + 0.05 * torch.randn(embed.shape, generator=torch.Generator().manual_seed(3))
    save_file(state, ft / "model.safetensors", metadata={"format": "pt"})
    text = f"""
models:
  - {{model: "{ft}", parameters: {{weight: 0.6, density: 0.7}}}}
  - {{model: "{zoo['ft_b']}", parameters: {{weight: 0.4, density: 0.6}}}}
merge_method: ties
base_model: "{zoo['base']}"
tokenizer_source: union
dtype: float32
"""
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "theirs"),
              options=MergeOptions(quiet=True, write_model_card=False))
    merge_to_disk(Recipe.from_yaml(text), tmp_path / "ours", device="cpu", progress=False)
    theirs, ours = load_state(tmp_path / "theirs"), load_state(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs) and "lm_head.weight" in ours
    for key, ref in theirs.items():
        scale = ref.abs().max().item() or 1.0
        assert (ours[key].double() - ref.double()).abs().max().item() / scale <= TOLERANCE, key
