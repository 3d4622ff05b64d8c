"""How the kernels share the CPU: a tensor split into ranges of whole blocks, run on the
calling thread and on a fixed pool of helper threads.

Every kernel runs over the blocks of the arrays it is given, on the calling thread, with
the GIL released; several threads split a tensor into slices of whole blocks and run a
kernel on each (``spread``). No numba parallel regions: their static split waited on
threads the OS had descheduled, their pool may not be entered from two Python threads at
once, and their outlined loops vectorized worse than these plain loops.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from merge_core.devices import cpu_cores
from merge_core.methods import runtime

BLOCK = 1 << 14          # elements per block: the per-model float32 rows stay in L2
RANGES_PER_THREAD = 4    # block ranges handed out per thread: a thread that falls behind
                         # (descheduled by the OS) leaves its remaining ranges to the others

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def block_count(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK


def thread_count() -> int:
    """How many threads the kernels run on: ``runtime.kernel_threads`` when set, else all
    cores less one (a disk merge keeps reader, writer and hashing threads busy beside them).
    One means the calling thread alone, so several Python threads may each run kernels."""
    wanted = runtime.kernel_threads.get()
    if wanted is None:
        wanted = cpu_cores() - 1
    return max(1, wanted)


def _helpers() -> ThreadPoolExecutor:
    """The helper threads, one per core, shared by every caller (a caller asking for more
    threads than cores gets no more at once: its extra requests wait in the queue and find
    nothing left to do)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=cpu_cores(), thread_name_prefix="brmerge-kernel")
        return _pool


def spread(fn: Callable[[int, int], Any], n: int, threads: int) -> list[Any]:
    """``fn(s, e)`` over ranges [s, e) of whole blocks covering ``n`` elements, results in
    the ranges' order; on ``threads`` threads (the caller's among them), each taking the
    next range when done with one. The kernels get each range as array slices whose
    block 0 is the range's first block (a kernel looping from a block number it cannot
    prove non-negative keeps its index checks, and runs markedly slower)."""
    nblocks = block_count(n)
    parts = 1 if threads <= 1 else min(nblocks, threads * RANGES_PER_THREAD)
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
