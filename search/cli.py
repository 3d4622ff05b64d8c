"""The ``brmerge`` command line.

Each subcommand lives in ``search/commands/<name>.py`` and exposes ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; adding a command is one file plus
one line in ``COMMANDS``. User errors (``merge_core.errors.BrmergeError``, raised with a
message naming the problem and the fix, and file-system errors on a path) print as one line
and exit with status 2; anything else, a plain ``ValueError`` included, is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

# name -> module under search.commands; order is the order shown by --help.
COMMANDS: dict[str, str] = {
    "init": "init",
    "search": "search",
    "status": "status",
    "dashboard": "dashboard",
    "report": "report",
    "export": "export",
    "merge": "merge",
    "eval": "eval",
    "demo": "demo",
    "plan": "plan",
}


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its errors as one line (argparse prints the usage too): a bad
    option reads like every other user error, and ``--help`` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="brmerge",
        description="Merge-search for Brazilian-Portuguese LLMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"search.commands.{module_name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("brmerge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not user_error(exc):
            raise    # a bug: keep its traceback
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"brmerge {args.command}: error: {message}", file=sys.stderr)
        return 2


def user_error(exc: BaseException) -> bool:
    """A ``BrmergeError`` (bad input, with its fix), or a file-system error on a path (a file
    the user named is missing, unreadable, in the way); anything else is a bug."""
    from merge_core.errors import BrmergeError

    return isinstance(exc, BrmergeError) or (isinstance(exc, OSError) and exc.filename is not None)


def entry() -> None:
    """The ``brmerge`` console script: ``main`` in a process of its own."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
