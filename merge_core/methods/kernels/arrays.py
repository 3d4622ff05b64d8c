"""Tensors as the arrays the kernels take: flat, zero-copy numpy views of their storage."""

from __future__ import annotations

import numpy as np
import torch

from merge_core.methods.kernels.scalars import BF16, EXP_BF16, EXP_F16, EXP_F32, F16, F32

KIND = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}   # dtype -> storage kind
EXPONENT = {F32: EXP_F32, BF16: EXP_BF16, F16: EXP_F16}                  # storage kind -> exponent bits


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
