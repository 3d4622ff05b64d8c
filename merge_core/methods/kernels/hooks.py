"""Test hooks: the scalar conversions and the hash of ``scalars``, vectorized, so tests can
compare them with torch and ``merge_core.rng`` directly."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from merge_core.methods.kernels.arrays import KIND
from merge_core.methods.kernels.scalars import KERNEL, decode, encode
from merge_core.methods.kernels.scalars import uniform as _uniform


@njit(**KERNEL)
def _uniform_kernel(seed: np.uint64, offset: int, out: np.ndarray) -> None:
    for i in range(out.size):
        out[i] = _uniform(seed, offset + i)


def uniform(n: int, *, seed: int, offset: int = 0) -> np.ndarray:
    """``merge_core.rng.uniform((n,), seed=seed, offset=offset)`` computed by the kernel hash."""
    out = np.empty(n, np.float32)
    _uniform_kernel(np.uint64(seed), offset, out)
    return out


@njit(**KERNEL)
def _round_kernel(values: np.ndarray, kind: int, out: np.ndarray) -> None:
    for i in range(values.size):
        out[i] = encode(values[i], kind)


@njit(**KERNEL)
def _widen_kernel(raw: np.ndarray, kind: int, out: np.ndarray) -> None:
    for i in range(raw.size):
        out[i] = decode(np.uint32(raw[i]), kind)


def round_to(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 ``values`` rounded to ``dtype`` by the kernels, as uint16 bits."""
    out = np.empty(values.size, np.uint16)
    _round_kernel(values.astype(np.float32), KIND[dtype], out)
    return out


def widen(raw: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """uint16 bits of ``dtype`` widened to float32 by the kernels."""
    out = np.empty(raw.size, np.float32)
    _widen_kernel(raw.astype(np.uint16), KIND[dtype], out)
    return out
