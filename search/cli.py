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
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("brmerge: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"brmerge {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
