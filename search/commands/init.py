"""``brmerge init``: write a commented campaign.yaml to start from."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write a commented campaign.yaml template"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", type=Path, default=Path("campaign.yaml"),
                   help="where to write it (default: ./campaign.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")


def run(args: argparse.Namespace) -> int:
    from search.campaign import TEMPLATE

    if args.path.exists() and not args.force:
        from merge_core.errors import BrmergeError

        raise BrmergeError(f"{args.path} exists: pass --force to overwrite it, or give another path")
    args.path.write_text(TEMPLATE, encoding="utf-8")
    print(f"wrote {args.path}: set base_model and models, then run `brmerge search {args.path}`")
    return 0
