"""Counter-based randomness for DARE/DELLA masks.

A mask must be bit-identical for the same recipe and seed on any device and in any
tensor order. Stateful generators (torch.Generator) give different streams on CPU and
CUDA, so each element's uniform number is a pure hash of (seed, element index),
computed with 64-bit integer ops that behave the same everywhere.
"""

from __future__ import annotations

import hashlib

import torch

# The hash, shared with the CPU kernels (``methods.kernels.scalars``), which compute it
# one element at a time.
MASK62 = (1 << 62) - 1
MUL1 = 0x3F58476D1CE4E5B9 & MASK62  # splitmix64-style odd constants, kept below 2**62
MUL2 = 0x14D049BB133111EB & MASK62
ROUNDS = ((31, MUL1), (29, MUL2), (32, MUL1))   # xor-shift, then multiply, in this order
FINAL_SHIFT = 29                                # one last xor-shift
BITS = 24                                       # bits kept: exactly representable in float32


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 62-bit seed for (seed, tensor name, model, ...), independent of order."""
    text = "\x1f".join([str(int(seed))] + [str(p) for p in parts])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") & MASK62


def uniform(shape: torch.Size | tuple[int, ...], *, seed: int, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32, offset: int = 0) -> torch.Tensor:
    """Uniform numbers in [0, 1) that depend only on ``seed`` and the element index.

    ``offset`` is the flat index of the first element, so a tensor drawn in chunks
    equals the tensor drawn at once.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    x = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    x.add_(seed).bitwise_and_(MASK62)
    # Three xor-shift-multiply rounds; products wrap modulo 2**64 identically on every
    # backend, and the mask keeps values non-negative so shifts stay logical.
    for shift, mul in ROUNDS:
        x.bitwise_xor_(x >> shift).mul_(mul).bitwise_and_(MASK62)
    x.bitwise_xor_(x >> FINAL_SHIFT)
    x >>= 62 - BITS
    return x.to(dtype).mul_(1.0 / (1 << BITS)).reshape(shape)
