"""The ``brmerge`` command line.

Each subcommand lives in ``search/commands/<name>.py`` and exposes ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; adding a command is one file plus
one line in ``COMMANDS``. User errors (``ValueError``/``OSError`` raised with a message
naming the problem and the fix) print as one line and exit with status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

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
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="brmerge",
        description="Merge-search for Brazilian-Portuguese LLMs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"search.commands.{module_name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run, _exit_at_once=getattr(module, "EXIT_AT_ONCE", False))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("brmerge: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"brmerge {args.command}: error: {message}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``brmerge`` console script: ``main`` in a process of its own.

    A command that sets ``EXIT_AT_ONCE`` (``merge``: everything it makes is written and
    closed when it returns) ends the process without tearing down the interpreter, which
    with torch loaded takes about a second; output streams and logging are flushed first.
    """
    args = build_parser().parse_args()
    code = _run(args)
    if args._exit_at_once:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
