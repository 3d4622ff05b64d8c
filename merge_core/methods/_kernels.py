"""Fused CPU kernels (numba) for generalized task arithmetic.

The torch code in ``task_arithmetic`` and ``sparsify`` is the reference and the CUDA
path. On CPU it makes several passes per chunk, each with its own temporaries; these
kernels do the same arithmetic in one pass per element, on as many threads as asked
(each takes ranges of blocks of the tensor; see ``_spread``):

- ``kth_largest_abs``: the exact k-th largest |delta| by a radix select on the float
  bits (|x| bit patterns order like the values): one histogram pass over the top 16
  bits, and for float32/float16 one more over the low 16 bits inside the chosen bucket.
- ``l1_norms``: the L1 norm of a delta before and after pruning (``rescale``).
- ``combine``: deltas, pruning, rescale, weights, sign election, normalization,
  lambda, base and the cast to the output dtype, written into a preallocated tensor.

Every float operation is the one torch performs, in the same order and in float32
(fastmath off), so results are bit-identical to the torch path. The one exception is
the order of the float64 L1 sums of ``rescale`` (see ``l1_norms``).

16-bit tensors travel as uint16 views (numpy has no bfloat16), float32 tensors as
float32 arrays (bit-cast loads kept LLVM from vectorizing), so each kernel compiles
once per storage width, not per dtype combination.
Set ``BRMERGE_KERNELS=torch`` to force the torch path everywhere.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from numba import njit

from merge_core.devices import cpu_cores
from merge_core.methods import runtime

ENV_VAR = "BRMERGE_KERNELS"  # "torch": the reference torch code; unset or "numba": these kernels

F32, BF16, F16 = 0, 1, 2
# exponent bits of each storage kind: all set means inf or NaN
EXP_F32, EXP_BF16, EXP_F16 = np.uint32(0x7F800000), np.uint32(0x7F80), np.uint32(0x7C00)
_KIND = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}

BLOCK = 1 << 14          # elements per block: the per-model float32 rows stay in L2
_RANGES_PER_THREAD = 4   # block ranges handed out per thread: a thread that falls behind
                         # (descheduled by the OS) leaves its remaining ranges to the others
_HIGH_BINS = 1 << 15     # top 16 bits of |x| (the sign bit is always 0)
_LOW_BINS = 1 << 16

# Keep flags, one int per model (mirror ``sparsify.Keep``).
NOTHING, DENSE, LO, HI, RANDOM = 1, 2, 4, 8, 16

# Every kernel runs over the blocks of the arrays it is given, on the calling thread, with
# the GIL released; several threads split a tensor into slices of whole blocks and run a
# kernel on each (``_spread``). No numba
# parallel regions: their static split waited on threads the OS had descheduled, their
# pool may not be entered from two Python threads at once, and their outlined loops
# vectorized worse (a fused combine ran 1.6x slower per thread).
_KERNEL = dict(cache=True, nogil=True, error_model="numpy")  # fastmath stays off
# Helpers are inlined into the kernels in numba IR: LLVM then sees whole loops (and
# vectorizes them); left as calls they cost ~3x. The price is compile time, paid once.
_INLINE = dict(cache=True, inline="always", error_model="numpy")

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


def _thread_count() -> int:
    """How many threads the kernels run on: ``runtime.kernel_threads`` when set, else all
    cores less one (a disk merge keeps reader, writer and hashing threads busy beside them).
    One means the calling thread alone, so several Python threads may each run kernels."""
    wanted = runtime.kernel_threads.get()
    if wanted is None:
        wanted = cpu_cores() - 1
    return max(1, wanted)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _helpers() -> ThreadPoolExecutor:
    """The helper threads, one per core, shared by every caller (a caller asking for more
    threads than cores gets no more at once: its extra requests wait in the queue and find
    nothing left to do)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=cpu_cores(), thread_name_prefix="brmerge-kernel")
        return _pool


def _spread(fn: Callable[[int, int], Any], n: int, threads: int) -> list[Any]:
    """``fn(s, e)`` over ranges [s, e) of whole blocks covering ``n`` elements, results in
    the ranges' order; on ``threads`` threads (the caller's among them), each taking the
    next range when done with one. The kernels get each range as array slices whose
    block 0 is the range's first block (a kernel looping from a block number it cannot
    prove non-negative kept its index checks and ran 2x slower)."""
    nblocks = _block_count(n)
    parts = 1 if threads <= 1 else min(nblocks, threads * _RANGES_PER_THREAD)
    if parts <= 1:
        return [fn(0, n)]
    bounds = [min(n, nblocks * i // parts * BLOCK) for i in range(parts + 1)]
    results: list[Any] = [None] * parts
    upcoming = iter(range(parts))
    lock = threading.Lock()

    def drain() -> None:
        while True:
            with lock:
                i = next(upcoming, None)
            if i is None:
                return
            results[i] = fn(bounds[i], bounds[i + 1])

    helpers = [_helpers().submit(drain) for _ in range(threads - 1)]
    try:
        drain()
    finally:
        for h in helpers:
            h.result()
    return results


def _block_count(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def storage(t: torch.Tensor) -> np.ndarray:
    """A flat zero-copy view of ``t`` for the kernels: float32 values as they are (the
    loops then vectorize), 16-bit floats as uint16 bits (numpy has no bfloat16)."""
    flat = t.detach().contiguous().reshape(-1)
    if flat.dtype == torch.float32:
        return flat.numpy()
    return flat.view(torch.int16).numpy().view(np.uint16)


def bits(t: torch.Tensor) -> np.ndarray:
    """A flat zero-copy unsigned view of ``t``'s bits: uint32 for float32, uint16 otherwise."""
    a = storage(t)
    return a.view(np.uint32) if a.dtype == np.float32 else a


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
def _uniform(seed: np.uint64, i: int) -> np.float32:
    # merge_core.rng.uniform for one element, bit for bit (uint64 wraps as torch's int64 does)
    x = (np.uint64(i) + seed) & _MASK62
    x = ((x ^ (x >> np.uint64(31))) * _MUL1) & _MASK62
    x = ((x ^ (x >> np.uint64(29))) * _MUL2) & _MASK62
    x = ((x ^ (x >> np.uint64(32))) * _MUL1) & _MASK62
    x = x ^ (x >> np.uint64(29))
    return np.float32(x >> np.uint64(38)) * _INV24


@njit(**_INLINE)
def _block(blk: int, n: int) -> tuple[int, int]:
    s = blk * BLOCK
    return s, min(n, s + BLOCK)


# ---- row passes over one block: simple loops that LLVM vectorizes ----

@njit(**_INLINE)
def _delta_row(x: np.ndarray, b: np.ndarray, s: int, kind: int, row: np.ndarray, width: int) -> None:
    """row[j] = x[s + j] - b[s + j], rounded to the inputs' dtype (as torch.sub on bf16/fp16
    tensors: a float32 subtraction, then a rounding), as float32."""
    if kind == F32:                                   # float32 arrays (see ``storage``)
        for j in range(width):
            row[j] = np.float32(x[s + j]) - np.float32(b[s + j])
    elif kind == BF16:
        for j in range(width):
            diff = _f32(np.uint32(x[s + j]) << np.uint32(16)) - _f32(np.uint32(b[s + j]) << np.uint32(16))
            row[j] = _f32(_bf16_round(diff) << np.uint32(16))
    else:
        for j in range(width):
            diff = _f16_to_f32(np.uint32(x[s + j])) - _f16_to_f32(np.uint32(b[s + j]))
            row[j] = _f16_to_f32(_f16_round(diff))


@njit(**_INLINE)
def _prune_row(row: np.ndarray, s: int, flags: int, lo: np.float32, hi: np.float32, density: np.float32,
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
            row[j] = row[j] * (one if _uniform(seed, s + j) < density else zero)


@njit(**_INLINE)
def _weighted_row(x: np.ndarray, b: np.ndarray, dense: np.ndarray, s: int, origin: int, kind: int, flags: int,
                  rule: np.ndarray, seed: np.uint64, row: np.ndarray, total: np.ndarray, first: bool,
                  width: int) -> None:
    """One model's pruned, rescaled, weighted delta on one block; ``rule`` is
    (lo, hi, density, scale, weight). Also adds it to ``total``, the sum over models in
    their order (``first``: this is the first model, ``total`` starts here)."""
    one, zero = np.float32(1.0), np.float32(0.0)
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
            _accumulate(row, total, first, width)
        return
    if flags & DENSE:
        for j in range(width):
            row[j] = dense[s + j]
    elif not flags & NOTHING:
        _delta_row(x, b, s, kind, row, width)
    _prune_row(row, origin + s, flags & ~DENSE, rule[0], rule[1], rule[2], seed, width)
    scale, w = rule[3], rule[4]
    for j in range(width):
        row[j] = row[j] * scale * w
    _accumulate(row, total, first, width)


@njit(**_INLINE)
def _accumulate(row: np.ndarray, total: np.ndarray, first: bool, width: int) -> None:
    # branch-free loops (a select inside the loop kept it from vectorizing)
    if first:
        for j in range(width):
            total[j] = row[j]
    else:
        for j in range(width):
            total[j] = total[j] + row[j]


@njit(**_INLINE)
def _elect_rows(rows: np.ndarray, n_models: int, weights: np.ndarray, normalize: bool, mixed: np.ndarray,
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


@njit(**_INLINE)
def _store_row(mixed: np.ndarray, b: np.ndarray, s: int, kind: int, out: np.ndarray, width: int) -> int:
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
            out[s + j] = _bf16_round(mixed[j] + _f32(np.uint32(b[s + j]) << np.uint32(16)))
        exp = EXP_BF16
    else:
        for j in range(width):
            out[s + j] = _f16_round(mixed[j] + _f16_to_f32(np.uint32(b[s + j])))
        exp = EXP_F16
    for j in range(width):
        finite += np.int32((np.uint32(out[s + j]) & exp) != exp)
    return width - finite


@njit(**_INLINE)
def _abs_bits_row(row: np.ndarray, keys: np.ndarray) -> None:
    for j in range(row.size):
        keys[j] = _bits(row[j]) & np.uint32(0x7FFFFFFF)


# ---- phase 1: the k-th largest |delta|, by a two-level radix select ----

@njit(**_INLINE)
def _abs_keys(x: np.ndarray, b: np.ndarray, s: int, e: int, kind: int) -> np.ndarray:
    """Bits of |x - b| over [s, e) as float32 bit patterns (ordered like the values); (e - s,) uint32."""
    row = np.empty(e - s, np.float32)
    keys = np.empty(e - s, np.uint32)
    _delta_row(x, b, s, kind, row, e - s)
    _abs_bits_row(row, keys)
    return keys

@njit(**_KERNEL)
def _high_histogram(x: np.ndarray, b: np.ndarray, kind: int) -> np.ndarray:
    """Counts of the top 16 bits of |x - b| (as float32 bits); (32768,) int64."""
    hist = np.zeros(_HIGH_BINS, np.int64)
    for blk in range((x.size + BLOCK - 1) // BLOCK):
        s, e = _block(blk, x.size)
        keys = _abs_keys(x, b, s, e, kind)
        for j in range(e - s):
            hist[keys[j] >> np.uint32(16)] += 1
    return hist


@njit(**_KERNEL)
def _low_histogram(x: np.ndarray, b: np.ndarray, kind: int, buckets: np.ndarray) -> np.ndarray:
    """Counts of the low 16 bits of |x - b| among elements whose top bits are ``buckets[t]``;
    (len(buckets), 65536) int64."""
    hist = np.zeros((buckets.size, _LOW_BINS), np.int64)
    for blk in range((x.size + BLOCK - 1) // BLOCK):
        s, e = _block(blk, x.size)
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
    kind = _KIND[x.dtype]
    xa, ba = storage(x), storage(base)
    threads = _thread_count()
    high = sum(_spread(lambda s, e: _high_histogram(xa[s:e], ba[s:e], kind), xa.size, threads))
    picks = [_pick(high, k) for k in ks]
    if kind == BF16:                                    # a bf16 delta has no low bits
        return [float(np.uint32(bucket << 16).view(np.float32)) for bucket, _ in picks]
    buckets = np.array(sorted({bucket for bucket, _ in picks}), dtype=np.uint32)
    low = sum(_spread(lambda s, e: _low_histogram(xa[s:e], ba[s:e], kind, buckets), xa.size, threads))
    out = []
    for bucket, rank in picks:
        j = int(np.searchsorted(buckets, bucket))
        bits, _ = _pick(low[j], rank)
        out.append(float(np.uint32((bucket << 16) | bits).view(np.float32)))
    return out


# ---- rescale: L1 norms before and after pruning ----

@njit(**_KERNEL)
def _l1_kernel(x: np.ndarray, b: np.ndarray, dense: np.ndarray, kind: int, flags: int, lo: np.float32,
               hi: np.float32, density: np.float32, seed: np.uint64, origin: int, before: np.ndarray,
               after: np.ndarray) -> None:
    """Per block, the L1 norm of the delta before and after pruning, into ``before`` and
    ``after``; origin: the tensor index of element 0 (random masks hash it)."""
    for blk in range((x.size + BLOCK - 1) // BLOCK):
        s, e = _block(blk, x.size)
        row = np.empty(e - s, np.float32)
        _delta_row(x, b, s, kind, row, e - s)
        total = 0.0
        for j in range(e - s):
            total += abs(row[j])
        before[blk] = total
        if flags & DENSE:
            row[:] = dense[s:e]
        _prune_row(row, origin + s, flags & ~DENSE, lo, hi, density, seed, e - s)
        total = 0.0
        for j in range(e - s):
            total += abs(row[j])
        after[blk] = total


@njit(**_KERNEL)
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
    flags, lo, hi, density, seed = _rule(keep)
    dense = storage(keep.dense).view(np.float32) if keep.dense is not None else np.zeros(0, np.float32)
    xa, ba, kind = storage(x), storage(base), _KIND[x.dtype]
    nblocks = _block_count(xa.size)
    before, after = np.zeros(nblocks, np.float64), np.zeros(nblocks, np.float64)

    def part(s: int, e: int) -> None:
        blocks = slice(s // BLOCK, (e + BLOCK - 1) // BLOCK)
        _l1_kernel(xa[s:e], ba[s:e], dense[s:e] if dense.size else dense, kind, flags, lo, hi, density, seed, s,
                   before[blocks], after[blocks])

    _spread(part, xa.size, _thread_count())
    return _sum_in_order(before, after)


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
def _pair_f32_row(x0: np.ndarray, x1: np.ndarray, b: np.ndarray, s: int, rules: np.ndarray, flags: np.ndarray,
                  normalize: bool, lam: np.float32, use_lam: bool, out: np.ndarray, width: int) -> int:
    """The combine of the commonest search candidate, TIES-like over two float32 models
    (magnitude pruning or none, sign election), in one loop with nothing kept in rows: the
    same float32 operations in the same order as the general path, so the same bits. A
    model without pruning gets lo = -inf: its mask is then 1 (0 for NaN, and NaN * 0 and
    NaN * 1 are the same NaN), and d * 1 is d."""
    one, zero = np.float32(1.0), np.float32(0.0)
    no_cut = np.float32(-np.inf)
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
    for j in range(width):                            # its own loop: see _store_row
        finite += np.int32(abs(np.float32(out[s + j])) < inf)
    return width - finite


@njit(**_INLINE)
def _combine_block(base: np.ndarray, xs: tuple, dense: tuple, kind: int, flags: np.ndarray, rules: np.ndarray,
                   seeds: np.ndarray, weights: np.ndarray, sign_election: bool, normalize: bool,
                   norm_div: np.float32, lam: np.float32, use_lam: bool, out: np.ndarray, blk: int,
                   rows: np.ndarray, origin: int) -> int:
    """One block of the combine; ``rows``: (M + 3, BLOCK) float32 scratch (C-contiguous rows,
    so the loops vectorize): M weighted pruned delta rows, then mixed, divisor, total.
    Returns the number of inf/NaN values written."""
    s, e = _block(blk, base.size)
    width = e - s
    n_models = flags.size
    if kind == F32 and n_models == 2 and sign_election and ((flags[0] | flags[1]) & ~LO) == 0:
        return _pair_f32_row(xs[0], xs[1], base, s, rules, flags, normalize, lam, use_lam, out, width)
    total = rows[n_models + 2]
    for m in range(n_models):
        _weighted_row(xs[m], base, dense[m], s, origin, kind, flags[m], rules[m], seeds[m], rows[m], total,
                      m == 0, width)
    if sign_election:
        mixed = rows[n_models]
        _elect_rows(rows, n_models, weights, normalize, mixed, total, rows[n_models + 1], width)
    else:
        mixed = total                                   # the plain sum, models in order
        if normalize:
            for j in range(width):
                mixed[j] = mixed[j] / norm_div
    if use_lam:
        for j in range(width):
            mixed[j] = mixed[j] * lam
    return _store_row(mixed, base, s, kind, out, width)


@njit(**_KERNEL)
def _combine_kernel(base: np.ndarray, xs: tuple, dense: tuple, kind: int, flags: np.ndarray,
                    rules: np.ndarray, seeds: np.ndarray, sign_election: bool, normalize: bool,
                    norm_div: np.float32, lam: np.float32, use_lam: bool, out: np.ndarray,
                    weights: np.ndarray, rows: np.ndarray, origin: int) -> int:
    """The combine; rules: (M, 5) float32 columns lo, hi, density, scale, weight; weights:
    rules[:, 4]; rows: (M + 3, BLOCK) float32 scratch; origin: the tensor index of
    element 0 (the arrays may be a slice of the tensor; random masks hash the tensor
    index). Returns the number of inf/NaN values written. Weights and scratch come from
    the caller: allocated in here, they made LLVM give up on the block loops (1.9x slower)."""
    bad = 0
    for blk in range((base.size + BLOCK - 1) // BLOCK):
        bad += _combine_block(base, xs, dense, kind, flags, rules, seeds, weights, sign_election, normalize,
                              norm_div, lam, use_lam, out, blk, rows, origin)
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
    kind = _KIND[base.dtype]
    n_models = len(tensors)
    flags = np.zeros(n_models, np.int64)
    rules = np.zeros((n_models, 5), np.float32)       # lo, hi, density, scale, weight
    seeds = np.zeros(n_models, np.uint64)
    dense = []
    with np.errstate(over="ignore"):                  # a huge weight becomes inf, as torch's cast makes it
        for m, (keep, w) in enumerate(zip(keeps, weights)):
            f, lo, hi, density, seed = _rule(keep)
            flags[m], seeds[m] = f, seed
            rules[m] = (lo, hi, density, np.float32(keep.scale), np.float32(w))
            dense.append(storage(keep.dense).view(np.float32) if keep.dense is not None
                         else np.zeros(0, np.float32))
        total_w = sum(weights)
        norm_div = np.float32(total_w if abs(total_w) >= 1e-8 else 1.0)
        lam32 = np.float32(lam)
    if out is None:
        out = torch.empty(base.numel(), dtype=base.dtype)
    else:
        assert out.dtype == base.dtype and out.numel() == base.numel() and out.is_contiguous()
        out = out.view(-1)
    xs = [storage(t) for t in tensors]
    b, dest, weights = storage(base), storage(out), rules[:, 4].copy()
    no_dense = np.zeros(0, np.float32)

    def part(s: int, e: int) -> int:
        return _combine_kernel(b[s:e], _padded([x[s:e] for x in xs], b[:0]),
                               _padded([d[s:e] if d.size else d for d in dense], no_dense), kind, flags, rules,
                               seeds, sign_election, normalize, norm_div, lam32, lam != 1, dest[s:e], weights,
                               np.empty((n_models + 3, min(e - s, BLOCK)), np.float32), s)

    bad = sum(_spread(part, b.size, _thread_count()))
    tally = runtime.nonfinite.get()
    if tally is not None:
        tally.record(out, int(bad))
    return out


# ---- the resident merge's health check ----

_EXP = {F32: EXP_F32, BF16: EXP_BF16, F16: EXP_F16}


@njit(**_KERNEL)
def _nonfinite_kernel(bits: np.ndarray, exp: np.uint32) -> int:
    c = 0
    for j in range(bits.size):
        c += (np.uint32(bits[j]) & exp) == exp          # all exponent bits set: inf or NaN
    return c


def count_nonfinite(t: torch.Tensor) -> int:
    """The number of inf/NaN values of a float32/bfloat16/float16 CPU tensor, one pass."""
    raw, exp = bits(t), _EXP[_KIND[t.dtype]]
    return int(sum(_spread(lambda s, e: _nonfinite_kernel(raw[s:e], exp), raw.size, _thread_count())))


# ---- test hooks: the scalar conversions and the hash, vectorized ----

@njit(**_KERNEL)
def _uniform_kernel(seed: np.uint64, offset: int, out: np.ndarray) -> None:
    for i in range(out.size):
        out[i] = _uniform(seed, offset + i)


def uniform(n: int, *, seed: int, offset: int = 0) -> np.ndarray:
    """``merge_core.rng.uniform((n,), seed=seed, offset=offset)`` computed by the kernel hash."""
    out = np.empty(n, np.float32)
    _uniform_kernel(np.uint64(seed), offset, out)
    return out


@njit(**_KERNEL)
def _round_kernel(values: np.ndarray, kind: int, out: np.ndarray) -> None:
    for i in range(values.size):
        out[i] = _encode(values[i], kind)


@njit(**_KERNEL)
def _widen_kernel(bits: np.ndarray, kind: int, out: np.ndarray) -> None:
    for i in range(bits.size):
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
