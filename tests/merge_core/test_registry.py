"""The method registry: names without imports, one line per method that matches its module,
and every protocol member (capabilities included) declared by every method."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from merge_core import methods
from merge_core.errors import RecipeError
from merge_core.methods.base import MergeMethod


def test_every_line_names_a_method_of_its_module():
    by_module: dict[str, set[str]] = {}
    for name, module in methods._METHODS.items():
        by_module.setdefault(module, set()).add(name)
    for module, names in by_module.items():
        assert {m.name for m in importlib.import_module(module).METHODS} == names, module
    assert methods.names() == sorted(methods._METHODS)
    assert [m.name for m in methods.all_methods()] == sorted(methods._METHODS)


@pytest.mark.parametrize("name", sorted(methods._METHODS))
def test_methods_declare_the_protocol_and_their_capabilities(name):
    method = methods.get(name)
    assert isinstance(method, MergeMethod)
    assert isinstance(method.writes_out, bool) and isinstance(method.randomized, bool)


def test_register_refuses_a_method_without_its_capabilities():
    linear = methods.get("linear")
    fields = {f.name: getattr(linear, f.name) for f in dataclasses.fields(linear) if f.name != "writes_out"}

    @dataclasses.dataclass(frozen=True)
    class NoCapabilities:
        name: str
        title: str
        reference: str | None
        base: object
        randomized: bool
        min_models: int
        max_models: int | None
        params = ()

        def merge(self, base, tensors, params, *, seed=0):
            return tensors[0]

    with pytest.raises(TypeError, match="writes_out"):
        methods.register(NoCapabilities(**{**fields, "name": "no_capabilities"}))
    assert "no_capabilities" not in methods.names()


def test_names_and_name_checks_import_no_method():
    script = ("import sys\n"
              "from merge_core import methods\n"
              "names = methods.names()\n"
              "methods.check_name('ties')\n"
              "try:\n"
              "    methods.check_name('tiez')\n"
              "except ValueError as e:\n"
              "    print(e)\n"
              "print(len(names), [m for m in sys.modules if m.startswith('merge_core.methods.') or m == 'torch'])\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    err, loaded = res.stdout.splitlines()
    assert "did you mean 'ties'" in err
    assert loaded == f"{len(methods._METHODS)} ['merge_core.methods.base']"
    with pytest.raises(RecipeError, match="known methods"):
        methods.get("no_such_method")


def test_method_info_states_the_usual_capabilities_so_a_method_names_only_what_differs():
    @dataclasses.dataclass(frozen=True)
    class Copy(methods.MethodInfo):
        params = ()

        def merge(self, base, tensors, params, *, seed=0):
            return tensors[0]

    method = Copy(name="copy_first", title="Copy", max_models=1)
    assert (method.reference, method.base, method.randomized, method.writes_out, method.min_models,
            method.max_models) == (None, methods.BasePolicy.REQUIRED, False, False, 1, 1)
    methods.register(method)
    try:
        assert methods.get("copy_first") is method and "copy_first" in methods.names()
    finally:
        methods.unregister("copy_first")
    assert "copy_first" not in methods.names()
    with pytest.raises(ValueError, match="built in"):
        methods.unregister("ties")
    assert methods.get("ties").randomized is False and methods.get("dare_ties").randomized is True


def test_search_declarations_are_checked_when_a_method_is_declared():
    Search, Param, Scope = methods.Search, methods.Param, methods.Scope
    with pytest.raises(TypeError, match="below high"):
        Search(1.0, 0.0)
    with pytest.raises(TypeError, match="neutral 2.0 must lie within"):
        Search(0.0, 1.0, neutral=2.0)
    with pytest.raises(TypeError, match="non-zero neutral"):
        Search(0.0, 1.0, selects_model=True)

    def method_with(param):
        @dataclasses.dataclass(frozen=True)
        class OneParam(methods.MethodInfo):
            @property
            def params(self):
                return (param,)

            def merge(self, base, tensors, params, *, seed=0):
                return tensors[0]

        return OneParam(name="one_param", title="One parameter")

    with pytest.raises(TypeError, match="only numbers can be searched"):
        methods.register(method_with(Param("flag", bool, Scope.SHARED, False, search=Search())))
    with pytest.raises(TypeError, match="selects_model needs a per-model"):
        methods.register(method_with(Param("w", float, Scope.SHARED, search=Search(neutral=1.0, selects_model=True))))
    assert "one_param" not in methods.names()
