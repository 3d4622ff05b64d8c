"""Fixtures for the evaluator tests: a tiny model and its tokenizer, loaded once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets/transformers: never the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_lm(tiny_zoo):
    """(model, tokenizer) of the zoo's base model, in eval mode on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_zoo["base"]), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_zoo["base"]))
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def long_lm(tiny_zoo, tmp_path_factory):
    """A tiny model with a 2048-token window: sample prompts fit untruncated, so the
    evaluator's shared-prefix path is the one exercised (tiny_lm truncates at 512)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from search.demo.tiny import llama_config, make_llama

    config = llama_config()
    config.max_position_embeddings = 2048
    path = make_llama(tmp_path_factory.mktemp("long") / "model", seed=7, config=config,
                      tokenizer_dir=tiny_zoo["tokenizer"])
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="session")
def mistral_tokenizer(tmp_path_factory):
    """``mistral_tokenizer(file)``: a real Mistral tokenizer shipped in the mistral-common
    package (``data/<file>``: SentencePiece ``*.model.v*`` or Tekken ``tekken_*.json``), as
    transformers loads it, adding BOS."""
    import shutil
    from pathlib import Path

    mistral_common = pytest.importorskip("mistral_common")
    from transformers import LlamaTokenizer

    data = Path(mistral_common.__file__).parent / "data"
    cache = {}

    def load(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp("mistral_tok")
            if name.endswith(".json"):  # Tekken (Mistral NeMo and later), BOS added as they do
                from tokenizers.processors import TemplateProcessing
                from transformers import PreTrainedTokenizerFast

                shutil.copy(data / name, folder / "tekken.json")
                tok = PreTrainedTokenizerFast.from_pretrained(str(folder), bos_token="<s>",
                                                              eos_token="</s>")
                tok.backend_tokenizer.post_processor = TemplateProcessing(
                    single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
                cache[name] = tok
            else:
                shutil.copy(data / name, folder / "tokenizer.model")
                cache[name] = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True)
        return cache[name]

    return load


# Two chat templates in the shapes real models ship: Mistral's (BOS, system prompt block,
# [INST] turns, answers closed by EOS, no generation prompt) and Gemma's (no system role: it
# raises, and lm-eval then drops the system turn; the generation prompt ends in a newline).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "[SYSTEM_PROMPT]{{ m['content'] }}[/SYSTEM_PROMPT]{% elif m['role'] == 'user' %}"
    "[INST]{{ m['content'] }}[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.fixture(scope="session")
def chat_tokenizer(mistral_tokenizer):
    """``chat_tokenizer(kind)``: Mistral's v7 SentencePiece tokenizer with a chat template."""
    import copy

    def load(kind: str):
        tok = copy.deepcopy(mistral_tokenizer("mistral_instruct_tokenizer_241114.model.v7"))
        tok.chat_template = {"mistral": MISTRAL_TEMPLATE, "gemma": GEMMA_TEMPLATE}[kind]
        return tok

    return load
