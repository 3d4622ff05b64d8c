"""Settings a caller hands down to the methods for the duration of one merge.

The resident merge of the search (``merge_core.resident``) re-merges the same inputs
with new parameters thousands of times. Two things then pay off that a one-off disk
merge has no use for, and they travel here as context variables, so that a disk merge
running beside it (another thread, another context) is unaffected:

- ``MagnitudeCache``: the sorted |x - base| of each resident source tensor. The k-th
  largest magnitude, which magnitude pruning (TIES, breadcrumbs) needs for every
  tensor and density, is then one lookup instead of passes over the tensor. Exact: the
  value is the one ``sparsify.kth_largest_abs`` computes, so a candidate is still
  bit-identical to its disk merge.
- ``kernel_threads``: the CPU kernels' thread count. A disk merge leaves a core to its
  reader, writer and hashing threads; a resident merge has none of those.
- ``NonFiniteTally``: the CPU kernel counts inf/NaN values as it writes them, which
  spares the resident merge its health-check pass over each tensor.

What a method author must know of them (they are seen by the methods without being
arguments) is stated on the protocol, ``merge_core.methods.base.MergeMethod``, and in
docs/methods.md ("Adding a method"): they may make a merge faster, never different.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch

Key = tuple[int, int, torch.dtype, str]


def _key(t: torch.Tensor) -> Key:
    return t.data_ptr(), t.numel(), t.dtype, str(t.device)


class MagnitudeCache:
    """Sorted |x - base| of registered tensors, built on first use, within a byte budget.

    Only tensors registered with ``register`` are served: the cache holds them, so no
    other tensor can later occupy their memory and be mistaken for one of them. The
    sorted values keep the inputs' dtype, in which the difference is rounded anyway, so
    the cache costs one more copy of each source model (less when the budget is smaller:
    tensors beyond it are simply not cached).
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = max(0, int(budget_bytes))
        self.used_bytes = 0
        self.skipped = 0                       # tensors left uncached by the budget
        self._registered: dict[Key, torch.Tensor] = {}
        self._sorted: dict[tuple[Key, Key], torch.Tensor | None] = {}

    def register(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            self._registered[_key(t)] = t

    def _known(self, t: torch.Tensor) -> Key | None:
        if t.dim() != 1 or t.stride() != (1,):
            return None
        key = _key(t)
        return key if key in self._registered else None

    def sorted_abs(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor | None:
        """Ascending |x - base| (difference in the inputs' dtype) of two flat registered
        tensors, or None when they are not registered or the budget is spent."""
        kx, kb = self._known(x), self._known(base)
        if kx is None or kb is None:
            return None
        pair = (kx, kb)
        if pair not in self._sorted:
            nbytes = x.numel() * x.element_size()
            if self.used_bytes + nbytes > self.budget_bytes:
                self.skipped += 1
                self._sorted[pair] = None          # decided once; not retried every candidate
            else:
                self._sorted[pair] = sort_ascending(torch.sub(x, base).abs_())
                self.used_bytes += nbytes
        return self._sorted[pair]


# bytes per element -> (torch view, numpy unsigned view to sort, numpy signed view back)
_UNSIGNED = {2: (torch.int16, np.uint16, np.int16), 4: (torch.int32, np.uint32, np.int32),
             8: (torch.int64, np.uint64, np.int64)}


def sort_ascending(a: torch.Tensor) -> torch.Tensor:
    """``a`` (flat, non-negative or NaN) sorted ascending, NaN last, as ``torch.sort``.

    On CPU the bit patterns are sorted as unsigned integers (they order like the values
    when the sign bit is clear) by numpy's vectorized sort: much faster than ``torch.sort``
    there (see docs/methods.md), and it covers bfloat16, which numpy lacks.
    """
    if a.device.type != "cpu" or a.element_size() not in _UNSIGNED:
        return torch.sort(a).values
    as_torch, as_unsigned, as_signed = _UNSIGNED[a.element_size()]
    bits = a.contiguous().view(as_torch).numpy().view(as_unsigned)
    return torch.from_numpy(np.sort(bits).view(as_signed)).view(a.dtype)


class NonFiniteTally:
    """Counts of inf/NaN values that a kernel found while writing an output tensor, by the
    output's address: the resident merge then skips its own pass over that tensor."""

    def __init__(self) -> None:
        self._counts: dict[Key, int] = {}

    def record(self, out: torch.Tensor, count: int) -> None:
        self._counts[_key(out)] = count

    def pop(self, t: torch.Tensor) -> int | None:
        """The count recorded for exactly ``t``'s memory, once; None if none was."""
        return self._counts.pop(_key(t), None)


magnitudes: ContextVar[MagnitudeCache | None] = ContextVar("brmerge_magnitudes", default=None)
kernel_threads: ContextVar[int | None] = ContextVar("brmerge_kernel_threads", default=None)
nonfinite: ContextVar[NonFiniteTally | None] = ContextVar("brmerge_nonfinite", default=None)


@contextmanager
def settings(*, cache: MagnitudeCache | None = None, threads: int | None = None,
             tally: NonFiniteTally | None = None) -> Iterator[None]:
    """Use ``cache``, ``threads`` and ``tally`` for the merges run inside the block."""
    tokens = [(magnitudes, magnitudes.set(cache)), (kernel_threads, kernel_threads.set(threads)),
              (nonfinite, nonfinite.set(tally))]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)
