"""Fused CPU kernels (numba) for generalized task arithmetic.

The torch code in ``task_arithmetic`` and ``sparsify`` is the reference and the CUDA path.
On CPU it makes several passes per chunk, each with its own temporaries; these kernels do
the same arithmetic in one pass per element, on as many threads as asked. Every float
operation is the one torch performs, in the same order and in float32 (fastmath off), so
results are bit-identical to the torch path; the one exception is the order of the float64
L1 sums of ``rescale`` (see ``norms.l1_norms``).

- ``threads``: the helper pool and the split of a tensor into ranges of whole blocks;
- ``scalars``: compile options, bit casts, rounding to 16-bit floats, ``merge_core.rng``'s hash;
- ``arrays``: tensors as flat numpy views (16-bit floats as uint16);
- ``rows``: the per-block passes (delta, prune, weight, sign election, store) and the
  pruning rules (``Rule``, ``Models``);
- ``select``: ``kth_largest_abs``, the exact k-th largest |delta| by a radix select;
- ``norms``: ``l1_norms``, the L1 norms of a delta before and after pruning (``rescale``);
- ``fused``: ``combine``, the whole merge of a tensor in one pass;
- ``finite``: ``count_nonfinite``; ``hooks``: the scalar helpers vectorized, for tests.

Set ``BRMERGE_KERNELS=torch`` to force the torch path everywhere.
"""

from __future__ import annotations

import os

import torch

from merge_core.methods.kernels.arrays import KIND, bits, storage
from merge_core.methods.kernels.finite import count_nonfinite
from merge_core.methods.kernels.fused import combine
from merge_core.methods.kernels.hooks import round_to, uniform, widen
from merge_core.methods.kernels.norms import l1_norms
from merge_core.methods.kernels.select import kth_largest_abs
from merge_core.methods.kernels.threads import BLOCK

ENV_VAR = "BRMERGE_KERNELS"  # "torch": the reference torch code; unset or "numba": these kernels


def enabled() -> bool:
    """Whether the numba kernels may be used (the one place ``BRMERGE_KERNELS`` is read)."""
    return os.environ.get(ENV_VAR, "numba").strip().lower() != "torch"


def supports(*tensors: torch.Tensor) -> bool:
    """CPU tensors of one dtype among float32 / bfloat16 / float16, and kernels enabled."""
    if not enabled() or not tensors:
        return False
    dtype = tensors[0].dtype
    return dtype in KIND and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)


__all__ = ["BLOCK", "ENV_VAR", "bits", "combine", "count_nonfinite", "enabled", "kth_largest_abs", "l1_norms",
           "round_to", "storage", "supports", "uniform", "widen"]
