"""Fused CPU kernels (numba) for generalized task arithmetic.

The torch code in ``task_arithmetic`` and ``sparsify`` is the reference and the CUDA
path. On CPU it makes several passes per chunk, each with its own temporaries; these
kernels do the same arithmetic in one pass per element, on all cores:

- ``kth_largest_abs``: the exact k-th largest |delta| by a radix select on the float
  bits (|x| bit patterns order like the values): one histogram pass over the top 16
  bits, and for float32/float16 one more over the low 16 bits inside the chosen bucket.
- ``l1_norms``: the L1 norm of a delta before and after pruning (``rescale``).
- ``combine``: deltas, pruning, rescale, weights, sign election, normalization,
  lambda, base and the cast to the output dtype, written into a preallocated tensor.

Every float operation is the one torch performs, in the same order and in float32
(fastmath off), so results are bit-identical to the torch path. The one exception is
the order of the float64 L1 sums of ``rescale`` (see ``l1_norms``).

16-bit tensors travel as uint16 views (numpy has no bfloat16), float32 as uint32
views, so each kernel compiles once per storage width, not per dtype combination.
Set ``BRMERGE_KERNELS=torch`` to force the torch path everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from numba import get_num_threads, njit, prange

ENV_VAR = "BRMERGE_KERNELS"  # "torch": the reference torch code; unset or "numba": these kernels

F32, BF16, F16 = 0, 1, 2
_KIND = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}

BLOCK = 1 << 14          # elements per parallel work item: the per-model float32 rows stay in L2
_HIGH_BINS = 1 << 15     # top 16 bits of |x| (the sign bit is always 0)
_LOW_BINS = 1 << 16

# Keep flags, one int per model (mirror ``sparsify.Keep``).
NOTHING, DENSE, LO, HI, RANDOM = 1, 2, 4, 8, 16

_JIT = dict(parallel=True, cache=True, nogil=True, error_model="numpy")  # fastmath stays off
_INLINE = dict(cache=True, error_model="numpy")  # small helpers: LLVM inlines them

_MASK62 = np.uint64((1 << 62) - 1)
_MUL1 = np.uint64(0x3F58476D1CE4E5B9 & ((1 << 62) - 1))   # == merge_core.rng._MUL1
_MUL2 = np.uint64(0x14D049BB133111EB & ((1 << 62) - 1))   # == merge_core.rng._MUL2
_INV24 = np.float32(1.0 / (1 << 24))


def enabled() -> bool:
    """Whether the numba kernels may be used (the one place ``BRMERGE_KERNELS`` is read)."""
    return os.environ.get(ENV_VAR, "numba").strip().lower() != "torch"


def supports(*tensors: torch.Tensor) -> bool:
    """CPU tensors of one dtype among float32 / bfloat16 / float16, and kernels enabled."""
    if not enabled() or not tensors:
        return False
    dtype = tensors[0].dtype
    return dtype in _KIND and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)


def storage(t: torch.Tensor) -> np.ndarray:
    """A flat zero-copy unsigned view of ``t``'s bits: uint32 for float32, uint16 otherwise."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.float32:
        return flat.numpy().view(np.uint32)
    return flat.view(torch.int16).numpy().view(np.uint16)


# ---- scalar helpers: bit casts, rounding to 16-bit floats, the counter-based hash ----

@njit(**_INLINE)
def _f32(bits: np.uint32) -> np.float32:
    return np.uint32(bits).view(np.float32)


@njit(**_INLINE)
def _bits(f: np.float32) -> np.uint32:
    return np.float32(f).view(np.uint32)


@njit(**_INLINE)
def _bf16_round(f: np.float32) -> np.uint32:
    # c10::BFloat16's round-to-nearest-even; NaN becomes the canonical quiet NaN
    if f != f:
        return np.uint32(0x7FC0)
    u = _bits(f)
    return np.uint32((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(**_INLINE)
def _f16_to_f32(h: np.uint32) -> np.float32:
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == 0x1F:                                     # inf / NaN
        return _f32(sign | np.uint32(0x7F800000) | (m << np.uint32(13)))
    if e == 0:                                        # zero / subnormal: m * 2**-24, exact
        v = np.float32(m) * _INV24
        return -v if sign else v
    return _f32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13)))


@njit(**_INLINE)
def _f16_round(f: np.float32) -> np.uint32:
    # IEEE float32 -> binary16, round to nearest even (what torch's casts do)
    u = _bits(f)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    if a > 0x7F800000:                                # NaN: keep it quiet
        return sign | np.uint32(0x7E00) | ((a >> np.uint32(13)) & np.uint32(0x3FF))
    if a >= 0x477FF000:                               # >= 65520 rounds to inf
        return sign | np.uint32(0x7C00)
    if a >= 0x38800000:                               # a normal half: rebias, round 13 bits
        r = a - np.uint32(0x38000000)
        return sign | ((r + np.uint32(0xFFF) + ((r >> np.uint32(13)) & np.uint32(1))) >> np.uint32(13))
    if a <= 0x33000000:                               # <= 2**-25 ties down to zero
        return sign
    e = a >> np.uint32(23)                            # a subnormal half: m * 2**(e - 126) units
    m = (a & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
    shift = np.uint32(126) - e
    r = m >> shift
    rem = m & ((np.uint32(1) << shift) - np.uint32(1))
    half = np.uint32(1) << (shift - np.uint32(1))
    if rem > half or (rem == half and (r & np.uint32(1))):
        r += np.uint32(1)
    return sign | r


@njit(**_INLINE)
def _decode(bits: np.uint32, kind: int) -> np.float32:
    if kind == F32:
        return _f32(bits)
    if kind == BF16:
        return _f32(bits << np.uint32(16))
    return _f16_to_f32(bits)


@njit(**_INLINE)
def _encode(f: np.float32, kind: int) -> np.uint32:
    if kind == F32:
        return _bits(f)
    if kind == BF16:
        return _bf16_round(f)
    return _f16_round(f)


@njit(**_INLINE)
def _delta(x: np.ndarray, b: np.ndarray, i: int, kind: int) -> np.float32:
    # torch.sub on bf16/fp16 tensors subtracts in float32 and rounds to the inputs' dtype
    diff = _decode(np.uint32(x[i]), kind) - _decode(np.uint32(b[i]), kind)
    if kind == F32:
        return diff
    return _decode(_encode(diff, kind), kind)


@njit(**_INLINE)
def _uniform(seed: np.uint64, i: int) -> np.float32:
    # merge_core.rng.uniform for one element, bit for bit (uint64 wraps as torch's int64 does)
    x = (np.uint64(i) + seed) & _MASK62
    x = ((x ^ (x >> np.uint64(31))) * _MUL1) & _MASK62
    x = ((x ^ (x >> np.uint64(29))) * _MUL2) & _MASK62
    x = ((x ^ (x >> np.uint64(32))) * _MUL1) & _MASK62
    x = x ^ (x >> np.uint64(29))
    return np.float32(x >> np.uint64(38)) * _INV24


@njit(**_INLINE)
def _prune(d: np.float32, i: int, flags: int, lo: np.float32, hi: np.float32, density: np.float32,
           seed: np.uint64) -> np.float32:
    # sparsify.Keep.apply for one element: a pruned entry is multiplied by 0 (so -0.0 and
    # NaN behave as in torch's d.mul_(mask)), not replaced by 0
    one, zero = np.float32(1.0), np.float32(0.0)
    if flags & NOTHING:
        return zero
    if flags & (LO | HI):
        a = abs(d)
        keep = True
        if flags & LO:
            keep = a >= lo
        if flags & HI:
            keep = keep and a <= hi
        d = d * (one if keep else zero)
    if flags & RANDOM:
        d = d * (one if _uniform(seed, i) < density else zero)
    return d


@njit(**_INLINE)
def _block(blk: int, n: int) -> tuple[int, int]:
    s = blk * BLOCK
    return s, min(n, s + BLOCK)


# ---- phase 1: the k-th largest |delta|, by a two-level radix select ----

@njit(**_JIT)
def _high_histogram(x: np.ndarray, b: np.ndarray, kind: int, threads: int) -> np.ndarray:
    """Counts of the top 16 bits of |x - b| (as float32 bits); (32768,) int64."""
    n = x.size
    nblocks = (n + BLOCK - 1) // BLOCK
    parts = max(1, min(nblocks, threads))             # one private histogram per thread
    hist = np.zeros((parts, _HIGH_BINS), np.int64)
    for p in prange(parts):
        h = hist[p]
        for blk in range(p, nblocks, parts):
            s, e = _block(blk, n)
            for i in range(s, e):
                h[(_bits(_delta(x, b, i, kind)) & np.uint32(0x7FFFFFFF)) >> np.uint32(16)] += 1
    return hist.sum(axis=0)


@njit(**_JIT)
def _low_histogram(x: np.ndarray, b: np.ndarray, kind: int, buckets: np.ndarray, threads: int) -> np.ndarray:
    """Counts of the low 16 bits of |x - b| among elements whose top bits are ``buckets[j]``;
    (len(buckets), 65536) int64."""
    n = x.size
    nblocks = (n + BLOCK - 1) // BLOCK
    parts = max(1, min(nblocks, threads))
    nb = buckets.size
    hist = np.zeros((parts, nb, _LOW_BINS), np.int64)
    for p in prange(parts):
        for blk in range(p, nblocks, parts):
            s, e = _block(blk, n)
            for i in range(s, e):
                a = _bits(_delta(x, b, i, kind)) & np.uint32(0x7FFFFFFF)
                top = a >> np.uint32(16)
                for j in range(nb):
                    if top == buckets[j]:
                        hist[p, j, a & np.uint32(0xFFFF)] += 1
    return hist.sum(axis=0)


def _pick(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry (1-based) and its rank from the top inside it."""
    from_top = np.cumsum(hist[::-1])                    # (bins,) entries in bins >= each bin
    j = int(np.searchsorted(from_top, k))               # first count reaching k
    above = int(from_top[j - 1]) if j else 0
    return hist.size - 1 - j, k - above


def kth_largest_abs(x: torch.Tensor, base: torch.Tensor, ks: Sequence[int]) -> list[float]:
    """For each k (1 <= k <= n), the k-th largest |x - base|, the difference rounded to
    the inputs' dtype first: the value ``sparsify.kth_largest_abs`` returns."""
    kind = _KIND[x.dtype]
    xa, ba = storage(x), storage(base)
    high = _high_histogram(xa, ba, kind, get_num_threads())
    picks = [_pick(high, k) for k in ks]
    if kind == BF16:                                    # a bf16 delta has no low bits
        return [float(np.uint32(bucket << 16).view(np.float32)) for bucket, _ in picks]
    buckets = np.array(sorted({bucket for bucket, _ in picks}), dtype=np.uint32)
    low = _low_histogram(xa, ba, kind, buckets, get_num_threads())
    out = []
    for bucket, rank in picks:
        j = int(np.searchsorted(buckets, bucket))
        bits, _ = _pick(low[j], rank)
        out.append(float(np.uint32((bucket << 16) | bits).view(np.float32)))
    return out


# ---- rescale: L1 norms before and after pruning ----

@njit(**_JIT)
def _l1_kernel(x: np.ndarray, b: np.ndarray, dense: np.ndarray, kind: int, flags: int,
               lo: np.float32, hi: np.float32, density: np.float32, seed: np.uint64) -> tuple[float, float]:
    n = x.size
    nblocks = (n + BLOCK - 1) // BLOCK
    before = np.zeros(nblocks, np.float64)
    after = np.zeros(nblocks, np.float64)
    for blk in prange(nblocks):
        s, e = _block(blk, n)
        sb, sa = 0.0, 0.0
        for i in range(s, e):
            d = _delta(x, b, i, kind)
            sb += abs(d)
            kept = dense[i] if flags & DENSE else _prune(d, i, flags, lo, hi, density, seed)
            sa += abs(kept)
        before[blk], after[blk] = sb, sa
    # fixed blocks summed in order: the same result on any number of threads
    tb, ta = 0.0, 0.0
    for blk in range(nblocks):
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
    flags, lo, hi, density, seed = _rule(keep)
    dense = storage(keep.dense).view(np.float32) if keep.dense is not None else np.zeros(0, np.float32)
    return _l1_kernel(storage(x), storage(base), dense, _KIND[x.dtype], flags, lo, hi, density, seed)


def _rule(keep) -> tuple[int, np.float32, np.float32, np.float32, np.uint64]:
    """A ``sparsify.Keep`` as kernel scalars: flags, lo, hi, density (float32, as torch
    compares), seed."""
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
    return flags, lo, hi, density, np.uint64(keep.seed)


# ---- phase 2: the fused combine ----

@njit(**_INLINE)
def _elect(row: np.ndarray, weights: np.ndarray, normalize: bool) -> np.float32:
    """TaskArithmetic._combine with sign election, for one element; ``row`` (M,) holds the
    weighted pruned deltas."""
    one, zero = np.float32(1.0), np.float32(0.0)
    total = row[0]
    for m in range(1, row.size):
        total = total + row[m]
    positive = total >= 0                             # ties go positive, as in mergekit
    mixed, divisor = zero, zero
    for m in range(row.size):
        d = row[m]
        agree = one if (d > 0 if positive else d < 0) else zero
        mixed = mixed + d * agree
        divisor = divisor + agree * weights[m]        # torch: fma(agree, w, divisor), agree in {0, 1}
    if normalize:
        if divisor == 0:
            divisor = one
        mixed = mixed / divisor
    return mixed


@njit(**_JIT)
def _combine_kernel(base: np.ndarray, xs: tuple, dense: tuple, kind: int, flags: np.ndarray,
                    rules: np.ndarray, seeds: np.ndarray, sign_election: bool, normalize: bool,
                    norm_div: np.float32, lam: np.float32, use_lam: bool, out: np.ndarray) -> None:
    # rules: (M, 5) float32 columns lo, hi, density, scale, weight
    n = base.size
    n_models = flags.size
    weights = rules[:, 4].copy()
    nblocks = (n + BLOCK - 1) // BLOCK
    for blk in prange(nblocks):
        s, e = _block(blk, n)
        rows = np.empty((e - s, n_models), np.float32)   # (block, M) weighted pruned deltas
        for m in range(n_models):
            x, f, dn = xs[m], flags[m], dense[m]
            lo, hi, density, scale, w = rules[m, 0], rules[m, 1], rules[m, 2], rules[m, 3], rules[m, 4]
            seed = seeds[m]
            for i in range(s, e):
                if f & DENSE:
                    d = dn[i]
                else:
                    d = _prune(_delta(x, base, i, kind), i, f, lo, hi, density, seed)
                rows[i - s, m] = d * scale * w
        for i in range(s, e):
            row = rows[i - s]
            if sign_election:
                mixed = _elect(row, weights, normalize)
            else:
                mixed = row[0]
                for m in range(1, n_models):
                    mixed = mixed + row[m]
                if normalize:
                    mixed = mixed / norm_div
            if use_lam:
                mixed = mixed * lam
            out[i] = _encode(mixed + _decode(np.uint32(base[i]), kind), kind)


def _padded(arrays: list[np.ndarray], filler: np.ndarray) -> tuple[np.ndarray, ...]:
    # Tuples are padded to 4, 8, 16 ... entries: one compiled variant per size class,
    # not one per number of models.
    size = 4
    while size < len(arrays):
        size *= 2
    return tuple(arrays) + (filler,) * (size - len(arrays))


def combine(base: torch.Tensor, tensors: Sequence[torch.Tensor], keeps: Sequence, weights: Sequence[float], *,
            sign_election: bool, normalize: bool, lam: float) -> torch.Tensor:
    """``TaskArithmetic.merge``'s chunk loop in one fused pass; a flat tensor of
    ``base.dtype``. ``keeps`` are the models' ``sparsify.Keep`` rules."""
    kind = _KIND[base.dtype]
    n_models = len(tensors)
    flags = np.zeros(n_models, np.int64)
    rules = np.zeros((n_models, 5), np.float32)       # lo, hi, density, scale, weight
    seeds = np.zeros(n_models, np.uint64)
    dense = []
    for m, (keep, w) in enumerate(zip(keeps, weights)):
        f, lo, hi, density, seed = _rule(keep)
        flags[m], seeds[m] = f, seed
        rules[m] = (lo, hi, density, np.float32(keep.scale), np.float32(w))
        dense.append(storage(keep.dense).view(np.float32) if keep.dense is not None else np.zeros(0, np.float32))
    total_w = sum(weights)
    norm_div = np.float32(total_w if abs(total_w) >= 1e-8 else 1.0)
    out = torch.empty(base.numel(), dtype=base.dtype)
    xs = [storage(t) for t in tensors]
    b = storage(base)
    _combine_kernel(b, _padded(xs, b[:0]), _padded(dense, np.zeros(0, np.float32)), kind, flags, rules, seeds,
                    sign_election, normalize, norm_div, np.float32(lam), lam != 1, storage(out))
    return out


# ---- test hooks: the scalar conversions and the hash, vectorized ----

@njit(**_JIT)
def _uniform_kernel(seed: np.uint64, offset: int, out: np.ndarray) -> None:
    for i in prange(out.size):
        out[i] = _uniform(seed, offset + i)


def uniform(n: int, *, seed: int, offset: int = 0) -> np.ndarray:
    """``merge_core.rng.uniform((n,), seed=seed, offset=offset)`` computed by the kernel hash."""
    out = np.empty(n, np.float32)
    _uniform_kernel(np.uint64(seed), offset, out)
    return out


@njit(**_JIT)
def _round_kernel(values: np.ndarray, kind: int, out: np.ndarray) -> None:
    for i in prange(values.size):
        out[i] = _encode(values[i], kind)


@njit(**_JIT)
def _widen_kernel(bits: np.ndarray, kind: int, out: np.ndarray) -> None:
    for i in prange(bits.size):
        out[i] = _decode(np.uint32(bits[i]), kind)


def round_to(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 ``values`` rounded to ``dtype`` by the kernels, as uint16 bits."""
    out = np.empty(values.size, np.uint16)
    _round_kernel(values.astype(np.float32), _KIND[dtype], out)
    return out


def widen(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """uint16 bits of ``dtype`` widened to float32 by the kernels."""
    out = np.empty(bits.size, np.float32)
    _widen_kernel(bits.astype(np.uint16), _KIND[dtype], out)
    return out
