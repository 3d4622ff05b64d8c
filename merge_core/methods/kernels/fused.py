"""The fused combine: ``TaskArithmetic.merge``'s chunk loop in one pass per element.

Deltas, pruning, rescale, weights, sign election, normalization, lambda, base and the cast
to the output dtype, written into a preallocated tensor; inf/NaN values are counted as
they are written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from numba import njit

from merge_core.methods import runtime
from merge_core.methods.kernels.arrays import KIND, storage
from merge_core.methods.kernels.rows import (
    LO,
    Models,
    block,
    elect_rows,
    rule_of,
    store_row,
    weighted_row,
)
from merge_core.methods.kernels.scalars import F32, INLINE, KERNEL
from merge_core.methods.kernels.threads import BLOCK, spread, thread_count


class Inputs(NamedTuple):
    """The arrays a combine reads: a range of the tensor, from element ``origin`` on (random
    masks hash the tensor index). Tuples are padded (see ``_padded``)."""
    base: np.ndarray         # (n,) base storage
    xs: tuple                # (n,) storage per model
    dense: tuple             # (n,) float32 kept delta per model, or (0,) when it has none
    origin: int


class Mix(NamedTuple):
    """How the weighted deltas become one."""
    sign_election: bool
    normalize: bool
    norm_div: np.float32     # without sign election: the sum of the weights (1 when ~0)
    lam: np.float32
    use_lam: bool


@njit(**INLINE)
def _pair_f32_row(x0: np.ndarray, x1: np.ndarray, b: np.ndarray, s: int, models: Models, normalize: bool,
                  lam: np.float32, use_lam: bool, out: np.ndarray, width: int) -> int:
    """The combine of the commonest search candidate, TIES-like over two float32 models
    (magnitude pruning or none, sign election), in one loop with nothing kept in rows: the
    same float32 operations in the same order as the general path, so the same bits. A
    model without pruning gets lo = -inf: its mask is then 1 (0 for NaN, and NaN * 0 and
    NaN * 1 are the same NaN), and d * 1 is d."""
    one, zero = np.float32(1.0), np.float32(0.0)
    no_cut = np.float32(-np.inf)
    rules, flags = models.rules, models.flags
    lo0 = rules[0, 0] if flags[0] & LO else no_cut
    lo1 = rules[1, 0] if flags[1] & LO else no_cut
    s0, w0, s1, w1 = rules[0, 3], rules[0, 4], rules[1, 3], rules[1, 4]
    for j in range(width):
        bj = np.float32(b[s + j])
        d0 = np.float32(x0[s + j]) - bj
        r0 = d0 * (one if abs(d0) >= lo0 else zero) * s0 * w0
        d1 = np.float32(x1[s + j]) - bj
        r1 = d1 * (one if abs(d1) >= lo1 else zero) * s1 * w1
        positive = (r0 + r1) >= 0                     # the weighted sum's sign (ties positive)
        a0 = np.float32((r0 > 0) if positive else (r0 < 0))
        a1 = np.float32((r1 > 0) if positive else (r1 < 0))
        mixed = (zero + r0 * a0) + r1 * a1
        if normalize:
            div = (zero + a0 * w0) + a1 * w1
            mixed = mixed / (one if div == 0 else div)
        if use_lam:
            mixed = mixed * lam
        out[s + j] = mixed + bj
    finite = 0
    inf = np.float32(np.inf)
    for j in range(width):                            # its own loop: see rows.store_row
        finite += np.int32(abs(np.float32(out[s + j])) < inf)
    return width - finite


@njit(**INLINE)
def _combine_block(inputs: Inputs, kind: int, models: Models, mix: Mix, out: np.ndarray, rows: np.ndarray,
                   blk: int) -> int:
    """One block of the combine; ``rows``: (M + 3, BLOCK) float32 scratch (C-contiguous rows,
    so the loops vectorize): M weighted pruned delta rows, then mixed, divisor, total.
    Returns the number of inf/NaN values written."""
    base, xs = inputs.base, inputs.xs
    s, e = block(blk, base.size)
    width = e - s
    flags = models.flags
    n_models = flags.size
    if kind == F32 and n_models == 2 and mix.sign_election and ((flags[0] | flags[1]) & ~LO) == 0:
        return _pair_f32_row(xs[0], xs[1], base, s, models, mix.normalize, mix.lam, mix.use_lam, out, width)
    total = rows[n_models + 2]
    for m in range(n_models):
        weighted_row(xs[m], base, inputs.dense[m], s, inputs.origin, kind, models, m, rows[m], total, width)
    if mix.sign_election:
        mixed = rows[n_models]
        elect_rows(rows, n_models, models.weights, mix.normalize, mixed, total, rows[n_models + 1], width)
    else:
        mixed = total                                   # the plain sum, models in order
        if mix.normalize:
            for j in range(width):
                mixed[j] = mixed[j] / mix.norm_div
    if mix.use_lam:
        for j in range(width):
            mixed[j] = mixed[j] * mix.lam
    return store_row(mixed, base, s, kind, out, width)


@njit(**KERNEL)
def combine_kernel(inputs: Inputs, kind: int, models: Models, mix: Mix, out: np.ndarray,
                   rows: np.ndarray) -> int:
    """The combine over ``inputs`` into ``out`` (the same range); rows: (M + 3, BLOCK)
    float32 scratch. Returns the number of inf/NaN values written. The scratch (and
    ``models.weights``) come from the caller: allocated in here, they made LLVM give up
    on the block loops."""
    bad = 0
    for blk in range((inputs.base.size + BLOCK - 1) // BLOCK):
        bad += _combine_block(inputs, kind, models, mix, out, rows, blk)
    return bad


def _padded(arrays: list[np.ndarray], filler: np.ndarray) -> tuple[np.ndarray, ...]:
    # Tuples are padded to 4, 8, 16 ... entries: one compiled variant per size class,
    # not one per number of models.
    size = 4
    while size < len(arrays):
        size *= 2
    return tuple(arrays) + (filler,) * (size - len(arrays))


def combine(base: torch.Tensor, tensors: Sequence[torch.Tensor], keeps: Sequence, weights: Sequence[float], *,
            sign_election: bool, normalize: bool, lam: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``TaskArithmetic.merge``'s chunk loop in one fused pass; a flat tensor of
    ``base.dtype``, written into ``out`` when given (contiguous, that dtype and size).
    ``keeps`` are the models' ``sparsify.Keep`` rules."""
    kind = KIND[base.dtype]
    n_models = len(tensors)
    flags = np.zeros(n_models, np.int64)
    rules = np.zeros((n_models, 5), np.float32)       # lo, hi, density, scale, weight
    seeds = np.zeros(n_models, np.uint64)
    dense = []
    with np.errstate(over="ignore"):                  # a huge weight becomes inf, as torch's cast makes it
        for m, (keep, w) in enumerate(zip(keeps, weights)):
            rule = rule_of(keep)
            flags[m], seeds[m] = rule.flags, rule.seed
            rules[m] = (rule.lo, rule.hi, rule.density, np.float32(keep.scale), np.float32(w))
            dense.append(storage(keep.dense).view(np.float32) if keep.dense is not None
                         else np.zeros(0, np.float32))
        total_w = sum(weights)
        mix = Mix(sign_election=bool(sign_election), normalize=bool(normalize),
                  norm_div=np.float32(total_w if abs(total_w) >= 1e-8 else 1.0), lam=np.float32(lam),
                  use_lam=lam != 1)
    if out is None:
        out = torch.empty(base.numel(), dtype=base.dtype)
    else:
        assert out.dtype == base.dtype and out.numel() == base.numel() and out.is_contiguous()
        out = out.view(-1)
    models = Models(flags=flags, rules=rules, seeds=seeds, weights=rules[:, 4].copy())
    xs = [storage(t) for t in tensors]
    b, dest = storage(base), storage(out)
    no_dense = np.zeros(0, np.float32)

    def part(s: int, e: int) -> int:
        inputs = Inputs(base=b[s:e], xs=_padded([x[s:e] for x in xs], b[:0]),
                        dense=_padded([d[s:e] if d.size else d for d in dense], no_dense), origin=s)
        return combine_kernel(inputs, kind, models, mix, dest[s:e],
                              np.empty((n_models + 3, min(e - s, BLOCK)), np.float32))

    bad = sum(spread(part, b.size, thread_count()))
    tally = runtime.nonfinite.get()
    if tally is not None:
        tally.record(out, int(bad))
    return out
