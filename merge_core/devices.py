"""Device selection shared by the merge, the resident API and the evaluator."""

from __future__ import annotations

import os

import torch

from merge_core.errors import MergeError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
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
