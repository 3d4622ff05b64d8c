"""``brmerge demo [--dir DIR] [--trials N] [--seed S] [--quiet]``: a real campaign end to end on
a CPU, from a model zoo trained here to an exported, verified merge."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = ("train a tiny model zoo (cached), search its merges with a real campaign, report and export "
        "the best: everything brmerge does, in minutes on a CPU")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from search.demo.run import DEFAULT_DIR, DEFAULT_TRIALS

    p.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                   help=f"campaign directory, replaced if an earlier demo made it (default: {DEFAULT_DIR})")
    p.add_argument("--trials", type=int, default=DEFAULT_TRIALS,
                   help=f"search budget, baselines included (default {DEFAULT_TRIALS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the zoo and of the search (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from search.demo.run import run_demo

    run_demo(directory=args.dir, trials=args.trials, seed=args.seed, progress=not args.quiet)
    return 0
