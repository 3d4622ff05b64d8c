"""Device selection shared by the merge, the resident API, the evaluator and the CLI.

Importing this module does not import torch (the command line builds its ``--device``
options from it before any command runs).
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from merge_core.errors import MergeError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
DEVICE_HELP = "auto (CUDA when present), cpu, or cuda[:N]"


def add_device_option(parser: argparse.ArgumentParser, *, what: str) -> None:
    """The one ``--device`` option of every command that runs tensors."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help=f"where {what}: {DEVICE_HELP} (default: auto)")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if isinstance(name, torch.device):
        return name
    text = str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MergeError(f"--device {name} asked for CUDA but no GPU is visible: use --device cpu or auto")
        return torch.device(text)
    if text == "cpu":
        return torch.device("cpu")
    raise MergeError(f"unknown device {name!r}: use auto, cpu or cuda[:N]")


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
