"""Every ``brmerge`` command, given a bad value of each of its options, answers with exactly
one line on stderr and exit status 2 (no traceback, no usage dump).

The cases are checked against the parser itself: a new command or a new option that takes a
value fails ``test_every_option_has_a_case`` until a case is added. A command checks its
arguments in order, so a case may stop at an earlier one (``export --device`` on a folder that
is not a campaign): what every case shows is that no bad input ends in a traceback.
"""

from __future__ import annotations

import argparse

import pytest

from search.cli import build_parser, main

# (command, option or positional, argv after the command). {tmp} is a temporary directory,
# {file} an existing file that is not what the command wants.
CASES: list[tuple[str, str, list[str]]] = [
    ("init", "path", ["{file}"]),                                # exists, no --force
    ("search", "campaign", ["{tmp}/missing.yaml"]),
    ("search", "--dir", ["{file}", "--dir", "{file}"]),
    ("search", "--workers", ["{file}", "--workers", "many"]),
    ("status", "dir", ["{tmp}"]),
    ("status", "--top", ["{tmp}", "--top", "x"]),
    ("dashboard", "dir", ["{tmp}"]),
    ("dashboard", "--port", ["{tmp}", "--port", "0"]),
    ("dashboard", "--port", ["{tmp}", "--port", "70000"]),
    ("dashboard", "--host", ["{tmp}", "--host", "not a host"]),
    ("dashboard", "--allowed-host", ["{tmp}", "--allowed-host", "http://evil.example/"]),
    ("report", "dir", ["{tmp}"]),
    ("report", "--out", ["{tmp}", "--out", "{file}"]),
    ("report", "--top", ["{tmp}", "--top", "x"]),
    ("export", "dir", ["{tmp}", "--out", "{tmp}/o"]),
    ("export", "--trial", ["{tmp}", "--trial", "x", "--out", "{tmp}/o"]),
    ("export", "--out", ["{tmp}"]),                              # required
    ("export", "--device", ["{tmp}", "--device", "tpu", "--out", "{tmp}/o"]),
    ("export", "--shard-size", ["{tmp}", "--shard-size", "huge", "--out", "{tmp}/o"]),
    ("merge", "recipe", ["{file}", "--out", "{tmp}/o"]),
    ("merge", "--out", ["{file}"]),                              # required
    ("merge", "--device", ["{file}", "--out", "{tmp}/o", "--device", "tpu"]),
    ("merge", "--shard-size", ["{file}", "--out", "{tmp}/o", "--shard-size", "huge"]),
    ("merge", "--seed", ["{file}", "--out", "{tmp}/o", "--seed", "x"]),
    ("eval", "model", ["{tmp}"]),                                # no model files
    ("eval", "--suite", ["{tmp}", "--suite", "mmlu"]),
    ("eval", "--tasks", ["{tmp}", "--tasks", "chemistry"]),
    ("eval", "--limit", ["{tmp}", "--limit", "-1"]),
    ("eval", "--leaderboard-era", ["{tmp}", "--leaderboard-era", "1999"]),
    ("eval", "--data-dir", ["{tmp}", "--suite", "dev", "--data-dir", "{tmp}/none"]),
    ("eval", "--num-fewshot", ["{tmp}", "--num-fewshot", "-2"]),
    ("eval", "--json", ["{tmp}", "--json", "{file}/x.json"]),
    ("eval", "--dtype", ["{tmp}", "--dtype", "int4"]),
    ("eval", "--max-batch-tokens", ["{tmp}", "--max-batch-tokens", "0"]),
    ("eval", "--device", ["{tmp}", "--device", "tpu"]),
    ("demo", "--dir", ["--dir", "{file}"]),
    ("demo", "--trials", ["--trials", "0"]),
    ("demo", "--seed", ["--seed", "x"]),
    ("plan", "campaign", ["{tmp}/missing.yaml"]),
    ("plan", "--gpu", ["{file}", "--gpu", "RTX-1"]),
    ("plan", "--gpu-memory", ["{tmp}/missing.yaml", "--gpu-memory", "lots"]),
]


def _value_options() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = {}
    for name, cmd in sub.choices.items():
        out[name] = {(a.option_strings[0] if a.option_strings else a.dest) for a in cmd._actions
                     if a.nargs != 0 and not isinstance(a, argparse._HelpAction)}
    return out


def test_every_option_has_a_case():
    covered: dict[str, set[str]] = {}
    for command, option, _ in CASES:
        covered.setdefault(command, set()).add(option)
    for command, options in _value_options().items():
        assert options <= covered.get(command, set()), f"brmerge {command}: no bad-value case for " \
            f"{sorted(options - covered.get(command, set()))}"


@pytest.mark.parametrize(("command", "option", "argv"), CASES, ids=[f"{c}-{o}" for c, o, _ in CASES])
def test_a_bad_value_is_one_line_and_exit_2(command, option, argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "not-a-campaign.txt"
    file.write_text("x: 1\n")
    args = [a.format(tmp=tmp_path, file=file) for a in argv]
    try:
        rc = main([command, *args])
    except SystemExit as exit_:   # argparse's own errors
        rc = exit_.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert f"brmerge {command}" in err and "Traceback" not in err
