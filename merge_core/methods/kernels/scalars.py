"""Scalar helpers the kernels inline: compile options, storage kinds, float bit casts,
rounding to the 16-bit floats, and the counter-based hash of ``merge_core.rng``.

16-bit tensors travel as uint16 views (numpy has no bfloat16), float32 tensors as float32
arrays (bit-cast loads kept LLVM from vectorizing), so each kernel compiles once per
storage width, not per dtype combination.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from merge_core import rng

# Kernels: compiled once and cached on disk; they release the GIL (see ``threads``).
KERNEL = dict(cache=True, nogil=True, error_model="numpy")  # fastmath stays off
# Helpers are inlined into the kernels in numba IR: LLVM then sees whole loops (and
# vectorizes them), which it cannot across calls. The price is compile time, paid once.
INLINE = dict(cache=True, inline="always", error_model="numpy")

# Storage kinds, one compiled variant each.
F32, BF16, F16 = 0, 1, 2
# exponent bits of each storage kind: all set means inf or NaN
EXP_F32, EXP_BF16, EXP_F16 = np.uint32(0x7F800000), np.uint32(0x7F80), np.uint32(0x7C00)

# merge_core.rng's hash as uint64 constants (numba wraps uint64 products as torch wraps int64)
MASK62 = np.uint64(rng.MASK62)
(_SHIFT1, _MUL1), (_SHIFT2, _MUL2), (_SHIFT3, _MUL3) = (
    (np.uint64(shift), np.uint64(mul)) for shift, mul in rng.ROUNDS)
_FINAL_SHIFT = np.uint64(rng.FINAL_SHIFT)
_KEEP_SHIFT = np.uint64(62 - rng.BITS)
INV24 = np.float32(1.0 / (1 << rng.BITS))     # also 2**-24, the smallest float16 subnormal
assert rng.BITS == 24, "the float16 subnormal decoding below reuses INV24 as 2**-24"


@njit(**INLINE)
def f32(bits: np.uint32) -> np.float32:
    return np.uint32(bits).view(np.float32)


@njit(**INLINE)
def bits32(f: np.float32) -> np.uint32:
    return np.float32(f).view(np.uint32)


@njit(**INLINE)
def bf16_round(f: np.float32) -> np.uint32:
    # c10::BFloat16's round-to-nearest-even; NaN becomes the canonical quiet NaN
    if f != f:
        return np.uint32(0x7FC0)
    u = bits32(f)
    return np.uint32((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(**INLINE)
def f16_to_f32(h: np.uint32) -> np.float32:
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == 0x1F:                                     # inf / NaN
        return f32(sign | np.uint32(0x7F800000) | (m << np.uint32(13)))
    if e == 0:                                        # zero / subnormal: m * 2**-24, exact
        v = np.float32(m) * INV24
        return -v if sign else v
    return f32(sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13)))


@njit(**INLINE)
def f16_round(f: np.float32) -> np.uint32:
    # IEEE float32 -> binary16, round to nearest even (what torch's casts do)
    u = bits32(f)
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


@njit(**INLINE)
def decode(bits: np.uint32, kind: int) -> np.float32:
    if kind == F32:
        return f32(bits)
    if kind == BF16:
        return f32(bits << np.uint32(16))
    return f16_to_f32(bits)


@njit(**INLINE)
def encode(f: np.float32, kind: int) -> np.uint32:
    if kind == F32:
        return bits32(f)
    if kind == BF16:
        return bf16_round(f)
    return f16_round(f)


@njit(**INLINE)
def uniform(seed: np.uint64, i: int) -> np.float32:
    # merge_core.rng.uniform for one element, bit for bit
    x = (np.uint64(i) + seed) & MASK62
    x = ((x ^ (x >> _SHIFT1)) * _MUL1) & MASK62
    x = ((x ^ (x >> _SHIFT2)) * _MUL2) & MASK62
    x = ((x ^ (x >> _SHIFT3)) * _MUL3) & MASK62
    x = x ^ (x >> _FINAL_SHIFT)
    return np.float32(x >> _KEEP_SHIFT) * INV24
