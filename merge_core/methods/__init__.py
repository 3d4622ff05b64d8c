"""Merge methods and their registry.

One small file per method family; adding a method is one file plus one line per method in
``_METHODS``. The registry names methods without importing their files (which import
torch), so a recipe can be read and its method name checked before torch loads; ``get``
imports the method's file. ``get(name)`` fails with the known names and the closest match.
"""

from __future__ import annotations

import importlib

from merge_core.errors import RecipeError, did_you_mean
from merge_core.methods.base import BasePolicy, MergeMethod, MergeParams, MethodInfo, Param, Scope, Search

# method name -> the module that defines it; each module exposes METHODS, a tuple of method objects.
_METHODS: dict[str, str] = {
    "linear": "merge_core.methods.linear",
    "slerp": "merge_core.methods.spherical",
    "nuslerp": "merge_core.methods.spherical",
    "task_arithmetic": "merge_core.methods.task_arithmetic",
    "ties": "merge_core.methods.task_arithmetic",
    "dare_ties": "merge_core.methods.task_arithmetic",
    "dare_linear": "merge_core.methods.task_arithmetic",
    "breadcrumbs": "merge_core.methods.task_arithmetic",
    "breadcrumbs_ties": "merge_core.methods.task_arithmetic",
    "della": "merge_core.methods.task_arithmetic",
    "della_linear": "merge_core.methods.task_arithmetic",
    "model_stock": "merge_core.methods.model_stock",
    "passthrough": "merge_core.methods.passthrough",
    "multislerp": "merge_core.methods.hypersphere",
    "karcher": "merge_core.methods.hypersphere",
    "sce": "merge_core.methods.consensus",
    "ram": "merge_core.methods.consensus",
    "ramplus_tl": "merge_core.methods.consensus",
    "nearswap": "merge_core.methods.selective",
    "arcee_fusion": "merge_core.methods.selective",
}

_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> None:
    missing = [m for m in _PROTOCOL_MEMBERS if not hasattr(method, m)]
    if missing:
        raise TypeError(f"merge method {getattr(method, 'name', method)!r} lacks {', '.join(missing)}: "
                        "declare every member of merge_core.methods.base.MergeMethod")
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _check_search(method)
    _REGISTRY[method.name] = method


def unregister(name: str) -> None:
    """Forget a method ``register`` added outside ``_METHODS`` (a test's, a plugin's)."""
    if name in _METHODS:
        raise ValueError(f"merge method {name!r} is built in: remove its line in _METHODS instead")
    _REGISTRY.pop(name, None)


def _check_search(method: MergeMethod) -> None:
    """What a campaign reads off a parameter's ``Search`` must make sense (``search.genome``)."""
    for p in method.params:
        if p.search is None:
            continue
        if p.kind not in (float, int):
            raise TypeError(f"merge method {method.name!r}: parameter {p.name!r} is a {p.kind.__name__}; "
                            "only numbers can be searched (drop its search=)")
        if p.search.selects_model and p.scope is Scope.SHARED:
            raise TypeError(f"merge method {method.name!r}: {p.name!r} is one value for the whole merge; "
                            "selects_model needs a per-model (model or input scope) parameter")


_PROTOCOL_MEMBERS = ("name", "title", "reference", "base", "randomized", "min_models", "max_models",
                     "writes_out", "params", "merge")
_loaded: set[str] = set()


def _load(module: str) -> None:
    if module in _loaded:
        return
    _loaded.add(module)
    for method in importlib.import_module(module).METHODS:
        register(method)


def names() -> list[str]:
    """Every method's name, without importing any method's file."""
    return sorted({*_METHODS, *_REGISTRY})


def all_methods() -> list[MergeMethod]:
    for module in dict.fromkeys(_METHODS.values()):
        _load(module)
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def get(name: str) -> MergeMethod:
    check_name(name)
    if name not in _REGISTRY:
        _load(_METHODS[name])
    if name not in _REGISTRY:
        raise TypeError(f"{_METHODS[name]} defines no method {name!r}: fix its line in _METHODS")
    return _REGISTRY[name]


def check_name(name: str) -> None:
    """Fail on a name no method has, with the closest match; imports nothing."""
    if name in _METHODS or name in _REGISTRY:
        return
    known = names()
    raise RecipeError(f"unknown merge_method {name!r}{did_you_mean(name, known)}; "
                      f"known methods: {', '.join(known)}")


__all__ = ["BasePolicy", "MergeMethod", "MergeParams", "MethodInfo", "Param", "Scope", "Search", "get",
           "names", "all_methods", "check_name", "register", "unregister"]
