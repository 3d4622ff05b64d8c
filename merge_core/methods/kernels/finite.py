"""The health check of a merged tensor: its inf/NaN values, counted in one pass."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from merge_core.methods.kernels.arrays import EXPONENT, KIND, bits
from merge_core.methods.kernels.scalars import KERNEL
from merge_core.methods.kernels.threads import spread, thread_count


@njit(**KERNEL)
def _nonfinite_kernel(raw: np.ndarray, exp: np.uint32) -> int:
    c = 0
    for j in range(raw.size):
        c += (np.uint32(raw[j]) & exp) == exp           # all exponent bits set: inf or NaN
    return c


def count_nonfinite(t: torch.Tensor) -> int:
    """The number of inf/NaN values of a float32/bfloat16/float16 CPU tensor, one pass."""
    raw, exp = bits(t), EXPONENT[KIND[t.dtype]]
    return int(sum(spread(lambda s, e: _nonfinite_kernel(raw[s:e], exp), raw.size, thread_count())))
