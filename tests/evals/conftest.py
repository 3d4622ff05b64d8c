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
    """``mistral_tokenizer(file)``: a real Mistral SentencePiece tokenizer shipped in the
    mistral-common package (``data/<file>``), as transformers loads it (adds BOS)."""
    import shutil
    from pathlib import Path

    mistral_common = pytest.importorskip("mistral_common")
    from transformers import LlamaTokenizer

    data = Path(mistral_common.__file__).parent / "data"
    cache = {}

    def load(name: str):
        if name not in cache:
            folder = tmp_path_factory.mktemp("mistral_tok")
            shutil.copy(data / name, folder / "tokenizer.model")
            cache[name] = LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True)
        return cache[name]

    return load
