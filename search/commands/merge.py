"""``brmerge merge RECIPE.yaml --out DIR``: one mergekit-compatible recipe to a model folder."""

from __future__ import annotations

import argparse
import gc
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from merge_core.devices import add_device_option
from types import FrameType

HELP = "merge models with a mergekit-compatible recipe into a Hugging Face model folder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=Path, help="recipe YAML (mergekit format; see docs/methods.md)")
    p.add_argument("--out", required=True, type=Path, help="output model folder (created atomically)")
    add_device_option(p, what="tensors are merged")
    p.add_argument("--shard-size", default="5GB", help="largest weights shard, e.g. 5GB, 500MB (default: 5GB)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read pickle checkpoints (.bin); pickle can run code, so only for trusted models")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accept models whose config asks for custom code (the merge never runs it)")
    p.add_argument("--seed", type=int, default=None, help="seed for DARE/DELLA masks (overrides the recipe's)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an earlier brmerge output (never a source model or a folder "
                        "brmerge did not write)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    with _stop_on_sigterm():
        _hash_sources_early(args)

        from merge_core.materialize import merge_to_disk
        from merge_core.recipe import Recipe

        # The imports (torch, numba, ...) made millions of objects that live until exit; frozen,
        # the garbage collector skips them, during the merge and in its pass at interpreter exit.
        gc.freeze()
        recipe = Recipe.from_file(args.recipe)
        text = args.recipe.read_text(encoding="utf-8")
        if args.seed is not None:
            recipe = replace(recipe, seed=args.seed)
            text = recipe.to_yaml()
        summary = merge_to_disk(recipe, args.out, device=args.device, shard_size=args.shard_size,
                                allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                                overwrite=args.overwrite, progress=not args.quiet, recipe_text=text)
    print(summary.line())
    return 0


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (a scheduler's stop, ``kill``) ends the merge as Ctrl-C does: the exception
    unwinds through the writer, which removes its partial folder; the exit status is 143."""
    if threading.current_thread() is not threading.main_thread():
        yield                                   # signal handlers can only be set on the main thread
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        print("brmerge merge: terminated; removing the partial output", file=sys.stderr)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _hash_sources_early(args: argparse.Namespace) -> None:
    """Start hashing the recipe's local source files for the provenance now, while torch
    loads (seconds of imports that the hashing would otherwise come after). The recipe's
    structure is read without its method (which would import torch). Best effort: whatever
    this cannot read is left to the real parse, which reports it."""
    from merge_core.provenance import hash_in_background
    from merge_core.recipe import Recipe
    from merge_core.sources import resolve_model

    try:
        refs = Recipe.from_file(args.recipe, check_params=False).referenced_models()
        files = []
        for ref in refs:
            if Path(ref).expanduser().is_dir():
                files += resolve_model(ref, allow_pickle=args.allow_pickle,
                                       trust_remote_code=args.trust_remote_code).weight_files
    except (ValueError, OSError):       # BrmergeError is a ValueError; so is SourceError
        return
    hash_in_background(files)
