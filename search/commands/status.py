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
    from search.storage import guard, load_campaign_study, resolve

    campaign, study = load_campaign_study(args.dir)
    with guard(resolve(campaign, args.dir), doing="read"):   # a damaged page is met here: one line
        text = (json.dumps(status_dict(study, args.dir), indent=2) if args.json
                else "\n".join(summary_lines(study, k=args.top, directory=args.dir)))
    print(text)
    return 0
