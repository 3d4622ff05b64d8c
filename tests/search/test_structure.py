"""The layout's promises: nothing shipped from tests/, one error root, bugs keep their traceback."""

from __future__ import annotations

import argparse
import ast
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

from search import cli

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("search", "merge_core", "evals", "benchmarks_ptbr", "perf", "examples")


def test_the_installed_packages_do_not_include_tests():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(where=str(REPO), include=include)
    assert "search.demo" in packages and "merge_core.methods" in packages
    assert not [p for p in packages if p == "tests" or p.startswith("tests.")]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_product_perf_or_example_module_imports_from_tests():
    offenders = [str(p.relative_to(REPO)) for top in PRODUCT for p in (REPO / top).rglob("*.py")
                 if any(n == "tests" or n.startswith("tests.") for n in _imports(p))]
    assert offenders == []


def test_readers_of_the_record_never_import_the_driver_or_ray():
    for name in ("status", "report", "figures", "export", "trials", "scheduler"):
        imported = _imports(REPO / "search" / f"{name}.py")
        assert not {"search.driver", "search.executor", "ray"} & imported, name


def _run(fn) -> int:
    return cli._run(argparse.Namespace(_run=fn, command="probe"))


def test_a_user_error_is_one_line_and_exit_status_2(capsys):
    from merge_core.errors import BrmergeError

    def bad(args):
        raise BrmergeError("eval.limit 0 must be positive: give a number of items\nsecond line")

    assert _run(bad) == 2
    err = capsys.readouterr().err
    assert err == "brmerge probe: error: eval.limit 0 must be positive: give a number of items\n"


def test_a_missing_path_the_user_gave_is_one_line(capsys, tmp_path):
    def bad(args):
        (tmp_path / "nope.yaml").read_text()

    assert _run(bad) == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_a_plain_value_error_is_a_bug_and_keeps_its_traceback():
    def buggy(args):
        raise ValueError("an internal invariant broke")

    with pytest.raises(ValueError, match="internal invariant"):
        _run(buggy)


def test_domain_errors_share_the_root():
    from benchmarks_ptbr.items import DataError
    from merge_core.checks import IncompatibleModelsError
    from merge_core.errors import BrmergeError, MergeError
    from merge_core.sources import SourceError
    from search.campaign import CampaignError
    from search.errors import SearchError
    from search.storage import StorageError

    for cls in (DataError, MergeError, CampaignError, SearchError, StorageError, SourceError,
                IncompatibleModelsError):
        assert issubclass(cls, BrmergeError), cls
