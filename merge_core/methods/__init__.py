"""Merge methods and their registry.

One small file per method family; adding a method is one file plus one line in
``_FAMILIES``. ``get(name)`` fails with the known names and the closest match.
"""

from __future__ import annotations

import difflib
import importlib

from merge_core.errors import RecipeError
from merge_core.methods.base import BasePolicy, MergeMethod, MergeParams, Param, Scope

# Each module exposes METHODS: tuple of method objects.
_FAMILIES = (
    "merge_core.methods.linear",
    "merge_core.methods.spherical",
    "merge_core.methods.task_arithmetic",
    "merge_core.methods.model_stock",
    "merge_core.methods.passthrough",
    "merge_core.methods.hypersphere",
    "merge_core.methods.consensus",
    "merge_core.methods.selective",
)

_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> None:
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method


def _load() -> None:
    if _REGISTRY:
        return
    for module in _FAMILIES:
        for method in importlib.import_module(module).METHODS:
            register(method)


def names() -> list[str]:
    _load()
    return sorted(_REGISTRY)


def all_methods() -> list[MergeMethod]:
    _load()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def get(name: str) -> MergeMethod:
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(
            f"unknown merge_method {name!r}{hint}; known methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


__all__ = ["BasePolicy", "MergeMethod", "MergeParams", "Param", "Scope", "get", "names",
           "all_methods", "register"]
