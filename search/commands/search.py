"""``brmerge search campaign.yaml [--dir DIR] [--resume [--accept-changed-models]]``: run (or
continue) a campaign."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "run a merge-search campaign (Optuna trials on Ray or local workers); --resume continues one"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("campaign", type=Path, help="campaign.yaml (see `brmerge init`)")
    p.add_argument("--dir", type=Path, default=None,
                   help="campaign directory: study, logs, reports, exports (default: ./campaigns/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the campaign's existing study")
    p.add_argument("--accept-changed-models", action="store_true",
                   help="with --resume: go on although a model's weights (or the folder a path resolves to) "
                        "changed since the campaign began; earlier scores are then not reused for a recipe "
                        "asked again")
    p.add_argument("--workers", type=int, default=None, help="override workers.count")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-trial lines")


def campaign_dir(name: str, given: Path | None) -> Path:
    return given if given is not None else Path("campaigns") / name


def run(args: argparse.Namespace) -> int:
    from merge_core.errors import BrmergeError
    from search.campaign import MAX_WORKERS, load_campaign
    from search.driver import run_campaign
    from search.protocol import ClusterLost
    from search.status import summary_lines
    from search.trials import finished_trials

    if args.workers is not None and not 1 <= args.workers <= MAX_WORKERS:
        raise BrmergeError(f"--workers {args.workers}: give a number of workers from 1 to {MAX_WORKERS}, or "
                           "leave it out for workers.count")
    accept = bool(getattr(args, "accept_changed_models", False))
    if accept and not args.resume:
        raise BrmergeError("--accept-changed-models applies to --resume only: add --resume, or drop it")
    campaign = load_campaign(args.campaign)
    directory = campaign_dir(campaign.name, args.dir)
    log = None if args.quiet else (lambda m: print(m, flush=True))
    try:
        study = run_campaign(campaign, directory, resume=args.resume, n_workers=args.workers,
                             progress=not args.quiet, log=log, accept_changed_models=accept)
    except KeyboardInterrupt:
        print(f"stopped; continue with: brmerge search {args.campaign} --dir {directory} --resume")
        return 130
    except ClusterLost as lost:
        print(f"{lost}: brmerge search {args.campaign} --dir {directory} --resume", file=sys.stderr)
        return 2
    print(f"{len(finished_trials(study))} trials in {directory}")
    for line in summary_lines(study):
        print(line)
    return 0
