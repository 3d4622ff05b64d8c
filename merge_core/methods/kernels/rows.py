"""Passes over one block of a tensor: simple loops that LLVM vectorizes, inlined into the
kernels. Every float operation is the one torch performs, in the same order and in float32.

A model's pruning rule travels as ``Rule`` (one model) or as rows of ``Models`` (all the
models of a combine): ``flags`` say which parts of ``sparsify.Keep`` apply.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from merge_core.methods.kernels.scalars import (
    BF16,
    EXP_BF16,
    EXP_F16,
    F32,
    INLINE,
    bf16_round,
    f16_round,
    f16_to_f32,
    f32,
    uniform,
)
from merge_core.methods.kernels.threads import BLOCK

# Keep flags, one int per model (mirror ``sparsify.Keep``).
NOTHING, DENSE, LO, HI, RANDOM = 1, 2, 4, 8, 16


class Rule(NamedTuple):
    """One model's ``sparsify.Keep`` as kernel scalars (float32, as torch compares)."""
    flags: int
    lo: np.float32           # keep |d| >= lo (LO)
    hi: np.float32           # keep |d| <= hi (HI)
    density: np.float32      # keep where uniform < density (RANDOM)
    seed: np.uint64          # the random mask's seed


class Models(NamedTuple):
    """The rules of every model of a combine, one row per model, in the models' order."""
    flags: np.ndarray        # (M,) int64 Keep flags
    rules: np.ndarray        # (M, 5) float32: lo, hi, density, scale, weight
    seeds: np.ndarray        # (M,) uint64
    weights: np.ndarray      # (M,) float32, rules[:, 4] as its own contiguous array


def rule_of(keep) -> Rule:
    """A ``sparsify.Keep`` as a ``Rule``."""
    flags = 0
    if keep.nothing:
        flags |= NOTHING
    elif keep.dense is not None:
        flags |= DENSE
    else:
        flags |= LO if keep.lo is not None else 0
        flags |= HI if keep.hi is not None else 0
        flags |= RANDOM if keep.density is not None else 0
    lo = np.float32(float(keep.lo)) if keep.lo is not None else np.float32(0)
    hi = np.float32(float(keep.hi)) if keep.hi is not None else np.float32(0)
    density = np.float32(keep.density) if keep.density is not None else np.float32(1)
    return Rule(flags, lo, hi, density, np.uint64(keep.seed))


@njit(**INLINE)
def block(blk: int, n: int) -> tuple[int, int]:
    s = blk * BLOCK
    return s, min(n, s + BLOCK)


@njit(**INLINE)
def delta_row(x: np.ndarray, b: np.ndarray, s: int, kind: int, row: np.ndarray, width: int) -> None:
    """row[j] = x[s + j] - b[s + j], rounded to the inputs' dtype (as torch.sub on bf16/fp16
    tensors: a float32 subtraction, then a rounding), as float32."""
    if kind == F32:                                   # float32 arrays (see ``storage``)
        for j in range(width):
            row[j] = np.float32(x[s + j]) - np.float32(b[s + j])
    elif kind == BF16:
        for j in range(width):
            diff = f32(np.uint32(x[s + j]) << np.uint32(16)) - f32(np.uint32(b[s + j]) << np.uint32(16))
            row[j] = f32(bf16_round(diff) << np.uint32(16))
    else:
        for j in range(width):
            diff = f16_to_f32(np.uint32(x[s + j])) - f16_to_f32(np.uint32(b[s + j]))
            row[j] = f16_to_f32(f16_round(diff))


@njit(**INLINE)
def prune_row(row: np.ndarray, s: int, flags: int, lo: np.float32, hi: np.float32, density: np.float32,
              seed: np.uint64, width: int) -> None:
    """sparsify.Keep.apply on one block of a delta; ``s``: the tensor index of row[0] (the
    random mask hashes it). A pruned entry is multiplied by 0 (so
    -0.0 and NaN come out as from torch's d.mul_(mask)), not replaced by 0."""
    one, zero = np.float32(1.0), np.float32(0.0)
    if flags & NOTHING:
        for j in range(width):
            row[j] = zero
        return
    if flags & LO and flags & HI:
        for j in range(width):
            a = abs(row[j])
            row[j] = row[j] * (one if (a >= lo) & (a <= hi) else zero)
    elif flags & LO:
        for j in range(width):
            row[j] = row[j] * (one if abs(row[j]) >= lo else zero)
    elif flags & HI:
        for j in range(width):
            row[j] = row[j] * (one if abs(row[j]) <= hi else zero)
    if flags & RANDOM:
        for j in range(width):
            row[j] = row[j] * (one if uniform(seed, s + j) < density else zero)


@njit(**INLINE)
def weighted_row(x: np.ndarray, b: np.ndarray, dense: np.ndarray, s: int, origin: int, kind: int,
                 models: Models, m: int, row: np.ndarray, total: np.ndarray, width: int) -> None:
    """Model ``m``'s pruned, rescaled, weighted delta on one block, into ``row``; also
    added to ``total``, the sum over models in their order (model 0 starts it)."""
    one, zero = np.float32(1.0), np.float32(0.0)
    flags, rule, first = models.flags[m], models.rules[m], m == 0
    if kind == F32 and (flags & ~LO) == 0:
        # the common case (TIES, task arithmetic on float32) in one loop, same operations
        lo, scale, w = rule[0], rule[3], rule[4]
        if flags & LO:
            if first:
                for j in range(width):
                    d = np.float32(x[s + j]) - np.float32(b[s + j])
                    r = d * (one if abs(d) >= lo else zero) * scale * w
                    row[j] = r
                    total[j] = r
            else:
                for j in range(width):
                    d = np.float32(x[s + j]) - np.float32(b[s + j])
                    r = d * (one if abs(d) >= lo else zero) * scale * w
                    row[j] = r
                    total[j] = total[j] + r
        else:
            for j in range(width):
                d = np.float32(x[s + j]) - np.float32(b[s + j])
                row[j] = d * scale * w
            accumulate(row, total, first, width)
        return
    if flags & DENSE:
        for j in range(width):
            row[j] = dense[s + j]
    elif not flags & NOTHING:
        delta_row(x, b, s, kind, row, width)
    prune_row(row, origin + s, flags & ~DENSE, rule[0], rule[1], rule[2], models.seeds[m], width)
    scale, w = rule[3], rule[4]
    for j in range(width):
        row[j] = row[j] * scale * w
    accumulate(row, total, first, width)


@njit(**INLINE)
def accumulate(row: np.ndarray, total: np.ndarray, first: bool, width: int) -> None:
    # branch-free loops (a select inside the loop kept it from vectorizing)
    if first:
        for j in range(width):
            total[j] = row[j]
    else:
        for j in range(width):
            total[j] = total[j] + row[j]


@njit(**INLINE)
def elect_rows(rows: np.ndarray, n_models: int, weights: np.ndarray, normalize: bool, mixed: np.ndarray,
               total: np.ndarray, divisor: np.ndarray, width: int) -> None:
    """TaskArithmetic._combine with sign election on one block: rows[:n_models, :width]
    hold the weighted pruned deltas, ``total`` their sum. Same float32 operations in the
    same order as torch."""
    zero = np.float32(0.0)
    for j in range(width):
        mixed[j] = zero
        divisor[j] = zero
    for m in range(n_models):
        w = weights[m]
        row = rows[m]
        for j in range(width):
            d = row[j]
            # the sign of d agrees with the majority sign (that of the sum; ties positive;
            # a NaN sum is not positive, as torch.where sees it)
            agree = np.float32((d > 0) if total[j] >= 0 else (d < 0))
            mixed[j] = mixed[j] + d * agree
            divisor[j] = divisor[j] + agree * w       # torch: fma(agree, w, divisor), agree in {0, 1}
    if normalize:
        one = np.float32(1.0)
        for j in range(width):
            div = divisor[j]
            mixed[j] = mixed[j] / (one if div == 0 else div)


@njit(**INLINE)
def store_row(mixed: np.ndarray, b: np.ndarray, s: int, kind: int, out: np.ndarray, width: int) -> int:
    """out[s + j] = mixed[j] + base, cast to the output (= base) dtype; returns how many
    of the stored values are inf or NaN (counted in a loop of its own, over the block in
    cache: inside the store loop it kept that loop from vectorizing)."""
    finite = 0
    if kind == F32:                                   # float32 arrays (see ``storage``)
        for j in range(width):
            out[s + j] = mixed[j] + np.float32(b[s + j])
        inf = np.float32(np.inf)
        for j in range(width):
            finite += np.int32(abs(np.float32(out[s + j])) < inf)
        return width - finite
    if kind == BF16:
        for j in range(width):
            out[s + j] = bf16_round(mixed[j] + f32(np.uint32(b[s + j]) << np.uint32(16)))
        exp = EXP_BF16
    else:
        for j in range(width):
            out[s + j] = f16_round(mixed[j] + f16_to_f32(np.uint32(b[s + j])))
        exp = EXP_F16
    for j in range(width):
        finite += np.int32((np.uint32(out[s + j]) & exp) != exp)
    return width - finite
