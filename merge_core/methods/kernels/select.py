"""The exact k-th largest |delta|, by a two-level radix select on the float bits (|x| bit
patterns order like the values): one histogram pass over the top 16 bits, and for
float32/float16 one more over the low 16 bits inside the chosen buckets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit

from merge_core.methods.kernels.arrays import KIND, storage
from merge_core.methods.kernels.rows import block, delta_row
from merge_core.methods.kernels.scalars import BF16, INLINE, KERNEL, bits32
from merge_core.methods.kernels.threads import BLOCK, spread, thread_count

_HIGH_BINS = 1 << 15     # top 16 bits of |x| (the sign bit is always 0)
_LOW_BINS = 1 << 16


@njit(**INLINE)
def _abs_bits_row(row: np.ndarray, keys: np.ndarray) -> None:
    for j in range(row.size):
        keys[j] = bits32(row[j]) & np.uint32(0x7FFFFFFF)


@njit(**INLINE)
def _abs_keys(x: np.ndarray, b: np.ndarray, s: int, e: int, kind: int) -> np.ndarray:
    """Bits of |x - b| over [s, e) as float32 bit patterns (ordered like the values); (e - s,) uint32."""
    row = np.empty(e - s, np.float32)
    keys = np.empty(e - s, np.uint32)
    delta_row(x, b, s, kind, row, e - s)
    _abs_bits_row(row, keys)
    return keys


@njit(**KERNEL)
def _high_histogram(x: np.ndarray, b: np.ndarray, kind: int) -> np.ndarray:
    """Counts of the top 16 bits of |x - b| (as float32 bits); (32768,) int64."""
    hist = np.zeros(_HIGH_BINS, np.int64)
    for blk in range((x.size + BLOCK - 1) // BLOCK):
        s, e = block(blk, x.size)
        keys = _abs_keys(x, b, s, e, kind)
        for j in range(e - s):
            hist[keys[j] >> np.uint32(16)] += 1
    return hist


@njit(**KERNEL)
def _low_histogram(x: np.ndarray, b: np.ndarray, kind: int, buckets: np.ndarray) -> np.ndarray:
    """Counts of the low 16 bits of |x - b| among elements whose top bits are ``buckets[t]``;
    (len(buckets), 65536) int64."""
    hist = np.zeros((buckets.size, _LOW_BINS), np.int64)
    for blk in range((x.size + BLOCK - 1) // BLOCK):
        s, e = block(blk, x.size)
        keys = _abs_keys(x, b, s, e, kind)
        for j in range(e - s):
            top = keys[j] >> np.uint32(16)
            for t in range(buckets.size):
                if top == buckets[t]:
                    hist[t, keys[j] & np.uint32(0xFFFF)] += 1
    return hist


def _pick(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry (1-based) and its rank from the top inside it."""
    from_top = np.cumsum(hist[::-1])                    # (bins,) entries in bins >= each bin
    j = int(np.searchsorted(from_top, k))               # first count reaching k
    above = int(from_top[j - 1]) if j else 0
    return hist.size - 1 - j, k - above


def kth_largest_abs(x: torch.Tensor, base: torch.Tensor, ks: Sequence[int]) -> list[float]:
    """For each k (1 <= k <= n), the k-th largest |x - base|, the difference rounded to
    the inputs' dtype first: the value ``sparsify.kth_largest_abs`` returns."""
    kind = KIND[x.dtype]
    xa, ba = storage(x), storage(base)
    threads = thread_count()
    high = sum(spread(lambda s, e: _high_histogram(xa[s:e], ba[s:e], kind), xa.size, threads))
    picks = [_pick(high, k) for k in ks]
    if kind == BF16:                                    # a bf16 delta has no low bits
        return [float(np.uint32(bucket << 16).view(np.float32)) for bucket, _ in picks]
    buckets = np.array(sorted({bucket for bucket, _ in picks}), dtype=np.uint32)
    low = sum(spread(lambda s, e: _low_histogram(xa[s:e], ba[s:e], kind, buckets), xa.size, threads))
    out = []
    for bucket, rank in picks:
        j = int(np.searchsorted(buckets, bucket))
        low_bits, _ = _pick(low[j], rank)
        out.append(float(np.uint32((bucket << 16) | low_bits).view(np.float32)))
    return out
