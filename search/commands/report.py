"""``brmerge report DIR [--out DIR/report]``: PNG figures and one self-contained HTML page."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "write a campaign's figures (PNG) and a self-contained HTML report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="campaign directory")
    p.add_argument("--out", type=Path, default=None, help="where to write the report (default: DIR/report)")
    p.add_argument("--top", type=int, default=10, help="how many best trials the table lists (default 10)")


def run(args: argparse.Namespace) -> int:
    from search.report import write_report

    report = write_report(args.dir, out=args.out, top=args.top)
    if not report.images:
        print("no completed trial yet: the report holds the campaign's facts only")
    for path in report.paths:
        print(path)
    return 0
