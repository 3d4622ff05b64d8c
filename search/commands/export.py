"""``brmerge export DIR [--trial N] --out MODEL_DIR``: the searched merge as a model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from merge_core.devices import add_device_option

HELP = "export a trial's merge (default: the best), verified by re-scoring, with dev/test scores in its card"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="campaign directory")
    p.add_argument("--trial", type=int, default=None, help="trial number (default: the best trial)")
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    add_device_option(p, what="the merge and the scoring run")
    p.add_argument("--shard-size", default="5GB", help="largest weights shard (default: 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an earlier brmerge output (never a source model, the "
                        "campaign directory, the working directory or one of its parents)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from search.export import export_trial

    res = export_trial(args.dir, out=args.out, trial=args.trial, device=args.device,
                       shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.quiet)
    for r in res.rows:
        test = f"{r['test']:.4f}" if r["test"] is not None else "-"
        print(f"{r['name']:<40} dev {r['dev']:.4f}  test {test}")
    print(f"exported trial {res.trial} to {res.out_dir}")
    return 0
