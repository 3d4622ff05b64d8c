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


# -- the record has one writer and one reader: search.trials ------------------------------------

_ATTR_WRITES = {"set_user_attr", "set_system_attr", "set_trial_user_attr", "set_trial_system_attr",
                "set_study_user_attr", "set_study_system_attr"}
_ATTR_READS = {"user_attrs", "system_attrs"}
# PublicStorage is an Optuna storage: it defines and forwards the storage-level attribute calls
_PASS_THROUGH = {"search/public_storage.py"}


def _record_access(path: Path) -> list[str]:
    """Raw attribute writes and reads in ``path``: (line, what) of each."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Attribute) and node.attr in _ATTR_WRITES | _ATTR_READS:
            out.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call):
            out += [f"{node.lineno}: {k.arg}=" for k in node.keywords if k.arg in _ATTR_READS]
    return out


def _shipped_and_perf() -> list[Path]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(where=str(REPO), include=include)
    files = [p for pkg in packages for p in (REPO / pkg.replace(".", "/")).glob("*.py")]
    return files + sorted((REPO / "perf").rglob("*.py"))


def test_only_search_trials_writes_or_reads_trial_and_study_attributes():
    files = _shipped_and_perf()
    assert REPO / "search" / "scheduler.py" in files and REPO / "perf" / "scheduling.py" in files
    offenders = {}
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        if rel == "search/trials.py":
            continue
        found = _record_access(path)
        if rel in _PASS_THROUGH:
            found = [f for f in found if not any(f.endswith(f".{w}") for w in _ATTR_WRITES)]
            found = [f for f in found if "user_attrs" not in f]   # masks the campaign in what it reads
        if found:
            offenders[rel] = found
    assert offenders == {}, "use search.trials (record_* to write, view() and its readers to read)"


def test_the_record_access_check_sees_each_kind_of_access(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("t.set_user_attr('a', 1)\nstudy.set_system_attr('b', 2)\nx = t.user_attrs['c']\n"
                     "y = t.user_attrs.get('d')\nstudy.enqueue_trial({}, user_attrs={'e': 1})\n"
                     "s.set_trial_user_attr(1, 'f', 2)\n")
    assert sorted(_record_access(probe)) == ["1: .set_user_attr", "2: .set_system_attr", "3: .user_attrs",
                                             "4: .user_attrs", "5: user_attrs=", "6: .set_trial_user_attr"]


def test_domain_and_suite_names_come_from_benchmarks_ptbr_sources():
    from benchmarks_ptbr import sources
    from evals import fitness, run
    from search import campaign
    from search.demo import table

    assert set(fitness.DEFAULT_WEIGHTS) == set(sources.DOMAINS)
    assert set(table.DOMAINS) <= set(sources.DOMAINS)
    from search.demo import facts   # the demo's own items sit in a loader folder of their domain
    assert all((f.folder, d) in {(s.name, s.domain) for s in sources.DATA_SOURCES}
               for d, f in facts.DOMAIN_FACTS.items())
    assert run.SUITES is sources.SUITES and set(campaign.SUITES) < set(sources.SUITES)


def test_the_default_sqlite_url_is_built_in_one_place(tmp_path):
    from search import storage

    offenders = [str(p.relative_to(REPO)) for p in _shipped_and_perf()
                 if p.name != "storage.py" and "study.db" in p.read_text(encoding="utf-8")]
    assert offenders == []
    assert storage.default_url(tmp_path) == f"sqlite:///{(tmp_path / 'study.db').resolve()}"
