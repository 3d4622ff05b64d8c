"""``brmerge status DIR``: best trials, baselines, progress and throughput of a campaign."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "show a campaign's progress, throughput, baselines and best trials"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="campaign directory")
    p.add_argument("--top", type=int, default=5, help="how many best trials to list (default 5)")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")


def run(args: argparse.Namespace) -> int:
    from search.status import status_dict, summary_lines
    from search.storage import load_study

    study = load_study(args.dir)
    if args.json:
        print(json.dumps(status_dict(study, args.dir), indent=2))
    else:
        print("\n".join(summary_lines(study, k=args.top, directory=args.dir)))
    return 0
