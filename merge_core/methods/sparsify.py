"""Pruning task vectors: magnitude top-k (TIES), random drop (DARE), outlier-trimmed
magnitude (breadcrumbs) and rank-weighted random drop (DELLA).

Semantics follow mergekit, with two deliberate differences (see docs/methods.md):
the top-k cut is found by selection, not a full sort, and elements tying exactly at
the cut-off are all kept; random masks come from ``merge_core.rng``, so they are the
same on every device and in any tensor order.

A pruning decision is taken on the whole delta (``Keep``: thresholds, a seed, a rescale
factor) and then applied chunk by chunk, so a large tensor is never expanded into
several full-size float32 temporaries.

The torch code here is the reference (and the CUDA path); on CPU the threshold search
and the rescale norms run in the fused numba kernels of ``kernels`` when they apply
(see ``kernels_for``), with the same results.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch

from merge_core import rng
from merge_core.errors import MergeError
from merge_core.methods import runtime

CHUNK = 1 << 18          # elements per chunk on a CPU: float32 temporaries stay in cache
# On a GPU each chunk is a handful of kernel launches whose fixed cost dwarfs the work on a
# small chunk, and device memory is plentiful: chunks as large as a big embedding matrix.
DEVICE_CHUNK = 1 << 26
_DIRECT_SELECT = 1 << 16  # below this, a plain kthvalue is as cheap as the bracketing search
_SAMPLE = 1 << 15


def spans(n: int, size: int = CHUNK) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def chunk_size(t: torch.Tensor) -> int:
    """Elements per chunk for work on ``t``'s device. Every operation in a chunk loop is
    elementwise and random masks hash each element's position, so the size never changes
    a result, only how many kernel launches it takes."""
    return CHUNK if t.device.type == "cpu" else DEVICE_CHUNK


def kernels_for(*tensors: torch.Tensor) -> ModuleType | None:
    """The fused CPU kernels when they apply to ``tensors`` (CPU, one dtype among
    float32/bfloat16/float16, not disabled by ``BRMERGE_KERNELS=torch``), else None."""
    if any(t.device.type != "cpu" for t in tensors):
        return None                                      # CUDA never imports numba
    from merge_core.methods import kernels

    return kernels if kernels.supports(*tensors) else None


class Delta:
    """``x - base`` of one model, flat, computed lazily per chunk.

    The subtraction happens in the inputs' dtype (as mergekit does: a bf16 merge rounds
    the delta to bf16), then moves to the work dtype.
    """

    def __init__(self, x: torch.Tensor, base: torch.Tensor, work: torch.dtype):
        self.x = x.reshape(-1)
        self.base = base.reshape(-1)
        self.work = work
        self.numel = self.x.numel()

    def chunk(self, start: int, end: int) -> torch.Tensor:
        return torch.sub(self.x[start:end], self.base[start:end]).to(self.work)

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        for s, e in spans(self.numel, chunk_size(self.x)):
            yield s, self.chunk(s, e)

    def full(self) -> torch.Tensor:
        return self.chunk(0, self.numel)

    def at(self, index: torch.Tensor) -> torch.Tensor:
        return torch.sub(self.x[index], self.base[index]).to(self.work)


def kth_largest_abs(delta: Delta, ks: list[int]) -> list[torch.Tensor]:
    """For each k, the k-th largest |delta| (1 <= k <= n), exactly.

    A seeded sample brackets each answer; one streaming pass counts the elements
    above each bracket and keeps the few inside it; a kthvalue on those finishes it.
    O(n) with a small constant where mergekit's full sort is O(n log n). Inside a
    resident merge (``runtime.MagnitudeCache``), one lookup in the sorted magnitudes.
    """
    cache = runtime.magnitudes.get()
    ranked = cache.sorted_abs(delta.x, delta.base) if cache is not None else None
    if ranked is not None:
        return [ranked[delta.numel - k].to(delta.work) for k in ks]
    kernels = kernels_for(delta.x, delta.base)
    if kernels is not None:
        return [torch.tensor(v, dtype=delta.work) for v in kernels.kth_largest_abs(delta.x, delta.base, ks)]
    n = delta.numel
    if n <= _DIRECT_SELECT:
        a = delta.full().abs()
        return [torch.kthvalue(a, n - k + 1).values for k in ks]
    idx = (rng.uniform((_SAMPLE,), seed=n, device=delta.x.device) * n).long().clamp_(max=n - 1)
    sample, _ = torch.sort(delta.at(idx).abs())
    brackets = []
    for k in ks:
        q = 1.0 - k / n                                  # quantile of the cut-off
        margin = 6.0 * (q * (1 - q) / _SAMPLE) ** 0.5 + 2.0 / _SAMPLE
        lo = sample[max(0, int((q - margin) * _SAMPLE))]
        hi = sample[min(_SAMPLE - 1, int((q + margin) * _SAMPLE) + 1)]
        brackets.append((lo, hi))
    above = [0] * len(ks)
    bands: list[list[torch.Tensor]] = [[] for _ in ks]
    for _, d in delta.chunks():
        a = d.abs_()
        for j, (lo, hi) in enumerate(brackets):
            above[j] += int((a > hi).sum())
            bands[j].append(a[(a >= lo) & (a <= hi)])
    out = []
    for k, count, parts in zip(ks, above, bands):
        band = torch.cat(parts)
        need = k - count                                 # rank inside the band, from the top
        if 1 <= need <= band.numel():
            out.append(torch.kthvalue(band, band.numel() - need + 1).values)
        else:                                            # bracket missed (vanishingly rare)
            out.append(torch.kthvalue(delta.full().abs(), n - k + 1).values)
    return out


def kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of a flat non-negative tensor ``a``."""
    return kth_largest_abs(Delta(a, torch.zeros_like(a), a.dtype), [k])[0]


@dataclass
class Keep:
    """Which entries of one model's delta survive pruning, and how they are rescaled."""

    lo: torch.Tensor | None = None        # keep lo <= |d|
    hi: torch.Tensor | None = None        # ... and |d| <= hi
    density: float | None = None          # random keep with this probability
    seed: int = 0
    dense: torch.Tensor | None = None     # a precomputed pruned delta (flat), e.g. DELLA's
    nothing: bool = False                 # everything pruned
    scale: float = 1.0                    # L1 rescale factor

    @property
    def everything(self) -> bool:
        return self.lo is None and self.hi is None and self.density is None and self.dense is None \
            and not self.nothing

    def apply(self, d: torch.Tensor, start: int) -> torch.Tensor:
        """Prune the chunk ``d`` (a flat slice starting at ``start``) in place."""
        if self.nothing:
            return d.zero_()
        if self.dense is not None:
            return d.copy_(self.dense[start:start + d.numel()])
        if self.lo is not None or self.hi is not None:
            a = d.abs()
            keep = a >= self.lo if self.lo is not None else torch.ones_like(a, dtype=torch.bool)
            if self.hi is not None:
                keep &= a <= self.hi
            d.mul_(keep)
        if self.density is not None:
            u = rng.uniform((d.numel(),), seed=self.seed, device=d.device, offset=start)
            d.mul_(u < self.density)
        return d


def with_rescale(delta: Delta, keep: Keep, eps: float = 1e-7) -> Keep:
    """Match the L1 norm of the unpruned delta (mergekit's ``rescale``)."""
    if keep.everything or keep.nothing:
        return keep
    kernels = kernels_for(delta.x, delta.base)
    if kernels is not None and delta.work == torch.float32:
        before, after = kernels.l1_norms(delta.x, delta.base, keep)
    else:
        # float64 sums: the factor then depends on the summation order only in the last
        # float64 bits, so the kernels' order gives the same float32 factor
        total = torch.zeros(2, dtype=torch.float64, device=delta.x.device)
        for s, d in delta.chunks():
            total[0] += d.abs().sum(dtype=torch.float64)
            total[1] += keep.apply(d, s).abs_().sum(dtype=torch.float64)
        before, after = total.tolist()
    if before >= eps and after >= eps:
        keep.scale = before / after
    return keep


def magnitude(delta: Delta, density: float) -> Keep:
    """Keep the ``density`` fraction of largest-magnitude entries (at least one)."""
    if density >= 1:
        return Keep()
    n = delta.numel
    if density <= 0 or n == 0:
        return Keep(nothing=True)
    k = max(1, int(density * n))
    return Keep(lo=kth_largest_abs(delta, [k])[0])


def magnitude_outliers(delta: Delta, density: float, gamma: float) -> Keep:
    """Drop the ``gamma`` fraction of largest entries, then the smallest, keeping ``density``."""
    if density >= 1:
        return Keep()
    n = delta.numel
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    if target <= 0:
        return Keep(nothing=True)
    # kept ascending ranks: [n_bottom, n_bottom + target)
    lo, hi = kth_largest_abs(delta, [n - n_bottom, n - (n_bottom + target - 1)])
    return Keep(lo=lo, hi=hi)


def random_drop(delta: Delta, density: float, *, seed: int) -> Keep:
    """DARE: keep each entry with probability ``density``."""
    if density >= 1:
        return Keep()
    return Keep(density=density, seed=seed)


def della_magprune(delta: Delta, density: float, epsilon: float, *, seed: int,
                   shape: torch.Size) -> Keep:
    """DELLA: the keep probability rises linearly with magnitude rank within each row,
    from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest)."""
    if density >= 1:
        return Keep()
    if density <= 0:
        return Keep(nothing=True)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeError(f"della needs density ± epsilon inside (0, 1); got density={density}, "
                         f"epsilon={epsilon}: lower epsilon or move density away from 0 and 1")
    d = delta.full().reshape(shape)
    rows = d if d.dim() >= 2 else d.unsqueeze(0)
    cols = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.argsort(order, dim=1, stable=True).to(d.dtype)   # 0 = smallest
    # a single-column row has no spread (mergekit divides by zero there): use the middle
    scaled = ranks / (cols - 1) if cols > 1 else torch.full_like(ranks, 0.5)
    probs = (density - epsilon) + scaled * (2 * epsilon)
    keep = rng.uniform(rows.shape, seed=seed, device=d.device) < probs
    return Keep(dense=(rows * keep).reshape(-1))


def prune(delta: torch.Tensor, keep: Keep) -> torch.Tensor:
    """Apply a ``Keep`` to a whole delta (tests and small tensors)."""
    flat = delta.reshape(-1).clone()
    return (keep.apply(flat, 0) * keep.scale).reshape(delta.shape)
