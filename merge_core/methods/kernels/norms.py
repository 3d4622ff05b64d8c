"""The L1 norm of a delta before and after pruning (``rescale``)."""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from merge_core.methods.kernels.arrays import KIND, storage
from merge_core.methods.kernels.rows import DENSE, Rule, block, delta_row, prune_row, rule_of
from merge_core.methods.kernels.scalars import KERNEL
from merge_core.methods.kernels.threads import BLOCK, block_count, spread, thread_count


@njit(**KERNEL)
def _l1_kernel(x: np.ndarray, b: np.ndarray, dense: np.ndarray, kind: int, rule: Rule, origin: int,
               before: np.ndarray, after: np.ndarray) -> None:
    """Per block, the L1 norm of the delta before and after pruning by ``rule``, into
    ``before`` and ``after``; origin: the tensor index of element 0 (random masks hash it)."""
    for blk in range((x.size + BLOCK - 1) // BLOCK):
        s, e = block(blk, x.size)
        row = np.empty(e - s, np.float32)
        delta_row(x, b, s, kind, row, e - s)
        total = 0.0
        for j in range(e - s):
            total += abs(row[j])
        before[blk] = total
        if rule.flags & DENSE:
            row[:] = dense[s:e]
        prune_row(row, origin + s, rule.flags & ~DENSE, rule.lo, rule.hi, rule.density, rule.seed, e - s)
        total = 0.0
        for j in range(e - s):
            total += abs(row[j])
        after[blk] = total


@njit(**KERNEL)
def _sum_in_order(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    # fixed blocks summed in order: the same result on any number of threads
    tb, ta = 0.0, 0.0
    for blk in range(before.size):
        tb += before[blk]
        ta += after[blk]
    return tb, ta


def l1_norms(x: torch.Tensor, base: torch.Tensor, keep) -> tuple[float, float]:
    """Float64 L1 norms of the delta before and after ``keep`` (a ``sparsify.Keep``).

    The only result here that is not bit-identical to torch: the float64 sums run in
    another order than torch's, so they may differ by a few float64 ulps; the rescale
    factor (``before / after``, used in float32) then differs by at most 1 float32 ulp,
    and only when it falls within ~1e-12 of a float32 rounding boundary.
    """
    rule = rule_of(keep)
    dense = storage(keep.dense).view(np.float32) if keep.dense is not None else np.zeros(0, np.float32)
    xa, ba, kind = storage(x), storage(base), KIND[x.dtype]
    nblocks = block_count(xa.size)
    before, after = np.zeros(nblocks, np.float64), np.zeros(nblocks, np.float64)

    def part(s: int, e: int) -> None:
        blocks = slice(s // BLOCK, (e + BLOCK - 1) // BLOCK)
        _l1_kernel(xa[s:e], ba[s:e], dense[s:e] if dense.size else dense, kind, rule, s,
                   before[blocks], after[blocks])

    spread(part, xa.size, thread_count())
    return _sum_in_order(before, after)
