"""``brmerge search campaign.yaml [--dir DIR] [--resume]``: run (or continue) a campaign."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "run a merge-search campaign (Optuna trials on Ray or local workers); --resume continues one"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("campaign", type=Path, help="campaign.yaml (see `brmerge init`)")
    p.add_argument("--dir", type=Path, default=None,
                   help="campaign directory: study, logs, reports, exports (default: ./campaigns/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the campaign's existing study")
    p.add_argument("--workers", type=int, default=None, help="override workers.count")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")


def campaign_dir(name: str, given: Path | None) -> Path:
    return given if given is not None else Path("campaigns") / name


def run(args: argparse.Namespace) -> int:
    from merge_core.errors import BrmergeError
    from search.campaign import load_campaign
    from search.driver import run_campaign
    from search.status import summary_lines
    from search.trials import finished_trials

    if args.workers is not None and args.workers < 1:
        raise BrmergeError(f"--workers {args.workers}: give a positive number of workers, or leave it out "
                           "for workers.count")
    campaign = load_campaign(args.campaign)
    directory = campaign_dir(campaign.name, args.dir)
    log = None if args.quiet else (lambda m: print(m, flush=True))
    try:
        study = run_campaign(campaign, directory, resume=args.resume, n_workers=args.workers,
                             progress=not args.quiet, log=log)
    except KeyboardInterrupt:
        print(f"stopped; continue with: brmerge search {args.campaign} --dir {directory} --resume")
        return 130
    print(f"{len(finished_trials(study))} trials in {directory}")
    for line in summary_lines(study):
        print(line)
    return 0
