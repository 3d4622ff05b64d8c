"""Fixtures for the merge-core tests: tiny models of every family, built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.merge_core.families import make_family


@pytest.fixture(scope="session")
def family_zoo(tmp_path_factory, tiny_zoo) -> Callable[[str], dict[str, Path]]:
    """``family_zoo(name)``: a base and three fine-tunes of that family (built on first use)."""
    root = tmp_path_factory.mktemp("families")
    built: dict[str, dict[str, Path]] = {}

    def get(name: str) -> dict[str, Path]:
        if name not in built:
            built[name] = make_family(name, root, tokenizer_dir=tiny_zoo["tokenizer"], fine_tunes=3)
        return built[name]

    return get
