"""Shared fixtures: tiny models built once per session, the PT-BR data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from search.demo.tiny import llama_config, make_llama, make_tokenizer

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared PT-BR data: $BRMERGE_DATA_DIR, else ../shared/data/ptbr beside the repo."""
    path = Path(os.environ.get("BRMERGE_DATA_DIR", REPO.parent / "shared" / "data" / "ptbr"))
    if not path.is_dir():
        pytest.skip(f"PT-BR data directory not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer, a base model and three fine-tunes of it (float32, 4 layers)."""
    root = tmp_path_factory.mktemp("zoo")
    tok = root / "tokenizer"
    make_tokenizer(tok)
    base = make_llama(root / "base", seed=0, config=llama_config(), tokenizer_dir=tok)
    zoo = {"tokenizer": tok, "base": base}
    for i, name in enumerate(["ft_a", "ft_b", "ft_c"], start=1):
        zoo[name] = make_llama(root / name, seed=i, like=base, tokenizer_dir=tok)
    return zoo
