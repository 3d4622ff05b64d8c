"""Generalized task arithmetic: task vectors against a base, optionally pruned,
optionally sign-elected, weighted and summed.

TIES, DARE, breadcrumbs and DELLA are configurations of this one function, as in
mergekit: deltas against the base; pruning of each delta; weights applied before sign
election; the majority sign is the sign of the weighted sum; ``normalize`` divides by
the sum of the weights that agree with it; ``lambda`` scales the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from merge_core import rng
from merge_core.methods import sparsify
from merge_core.methods.base import (FRACTION_SEARCH, KEEP_ALL_SEARCH, SCALE_SEARCH, WEIGHT_SEARCH,
                                     MergeParams, MethodInfo, Param, Scope, compute_dtype)


_RANDOM_PRUNES = ("random", "della_magprune")   # the prunes that draw masks from the seed


@dataclass(frozen=True, kw_only=True)
class TaskArithmetic(MethodInfo):
    prune: str | None            # None | magnitude | random | magnitude_outliers | della_magprune
    sign_election: bool
    default_normalize: bool
    default_rescale: bool
    writes_out: bool = True      # merge(..., out=) writes into a caller's tensor (see base.MergeMethod)
    randomized: bool = field(init=False, default=False)   # follows from prune: set below

    def __post_init__(self) -> None:
        object.__setattr__(self, "randomized", self.prune in _RANDOM_PRUNES)   # frozen: set once here

    @property
    def params(self) -> tuple[Param, ...]:
        out = [
            Param("weight", float, Scope.MODEL, doc="scale of this model's task vector", search=WEIGHT_SEARCH),
            Param("density", float, Scope.MODEL, 1.0, "fraction of the task vector kept", search=KEEP_ALL_SEARCH),
            Param("normalize", bool, Scope.SHARED, self.default_normalize,
                  "divide by the sum of (agreeing) weights"),
            Param("rescale", bool, Scope.SHARED, self.default_rescale,
                  "rescale pruned deltas to their original L1 norm"),
            Param("lambda", float, Scope.SHARED, 1.0, "scale of the merged task vector", search=SCALE_SEARCH),
            Param("int8_mask", bool, Scope.SHARED, False, "accepted for mergekit compatibility; no effect"),
        ]
        if self.prune == "magnitude_outliers":
            out.append(Param("gamma", float, Scope.MODEL, 0.01, "fraction of largest entries dropped",
                             search=FRACTION_SEARCH))
        if self.prune == "della_magprune":
            out.append(Param("epsilon", float, Scope.MODEL, 0.15, "spread of keep probabilities",
                             search=FRACTION_SEARCH))
        return tuple(out)

    def keep_rule(self, delta: sparsify.Delta, p: dict, *, rescale: bool, seed: int,
                  shape: torch.Size) -> sparsify.Keep:
        """Decide, on the whole delta, what pruning keeps of it."""
        density = float(p["density"])
        if self.prune is None:
            return sparsify.Keep()
        if self.prune == "magnitude":
            keep = sparsify.magnitude(delta, density)
        elif self.prune == "magnitude_outliers":
            keep = sparsify.magnitude_outliers(delta, density, float(p["gamma"]))
        elif self.prune == "random":
            keep = sparsify.random_drop(delta, density, seed=seed)
        else:
            keep = sparsify.della_magprune(delta, density, float(p["epsilon"]), seed=seed, shape=shape)
        return sparsify.with_rescale(delta, keep) if rescale else keep

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        assert base is not None  # guaranteed by the plan (BasePolicy.REQUIRED)
        work = compute_dtype(base)
        shared = params.shared
        weights = [float(p["weight"]) for p in params.models]
        deltas = [sparsify.Delta(x, base, work) for x in tensors]
        keeps = [self.keep_rule(d, p, rescale=bool(shared["rescale"]), seed=rng.derive_seed(seed, i),
                                shape=base.shape)
                 for i, (d, p) in enumerate(zip(deltas, params.models))]
        normalize = bool(shared["normalize"])
        lam = float(shared["lambda"])
        kernels = sparsify.kernels_for(base, *tensors)
        if kernels is not None and work == torch.float32:
            # the chunk loop below as one fused multi-threaded pass, same arithmetic (_kernels)
            merged = kernels.combine(base, tensors, keeps, weights, sign_election=self.sign_election,
                                     normalize=normalize, lam=lam, out=out)
            return merged.reshape(base.shape)
        total_w = sum(weights)
        flat_base = base.reshape(-1)
        if out is None:
            out = torch.empty_like(flat_base)
        out = out.view(-1)
        # Chunk by chunk: every float32 temporary stays small, whatever the tensor size.
        for start, end in sparsify.spans(flat_base.numel(), sparsify.chunk_size(flat_base)):
            weighted = []
            for delta, keep, w in zip(deltas, keeps, weights):
                d = keep.apply(delta.chunk(start, end), start)
                weighted.append(d.mul_(keep.scale).mul_(w))
            mixed = self._combine(weighted, weights, normalize=normalize, total_w=total_w)
            if lam != 1:
                mixed.mul_(lam)
            out[start:end] = mixed.add_(flat_base[start:end].to(work))
        return out.reshape(base.shape)

    def _combine(self, weighted: list[torch.Tensor], weights: list[float], *, normalize: bool,
                 total_w: float) -> torch.Tensor:
        """Sum the weighted task vectors of one chunk, with sign election if configured."""
        if not self.sign_election:
            mixed = weighted[0].clone()
            for d in weighted[1:]:
                mixed.add_(d)
            if normalize:
                mixed.div_(total_w if abs(total_w) >= 1e-8 else 1.0)
            return mixed
        total = weighted[0].clone()
        for d in weighted[1:]:
            total.add_(d)
        positive = total >= 0                          # the majority sign; ties go positive, as in mergekit
        mixed = torch.zeros_like(total)
        divisor = torch.zeros_like(total)
        for d, w in zip(weighted, weights):
            agree = torch.where(positive, d > 0, d < 0)  # sign(d) == majority sign
            mixed.add_(d * agree)
            if normalize:
                divisor.add_(agree, alpha=w)
        if normalize:
            divisor[divisor == 0] = 1
            mixed.div_(divisor)
        return mixed


_DARE, _BREADCRUMBS, _DELLA = ("https://arxiv.org/abs/2311.03099", "https://arxiv.org/abs/2312.06795",
                               "https://arxiv.org/abs/2406.11617")
METHODS = (
    TaskArithmetic(name="task_arithmetic", title="Task Arithmetic", reference="https://arxiv.org/abs/2212.04089",
                   prune=None, sign_election=False, default_normalize=False, default_rescale=False),
    TaskArithmetic(name="ties", title="TIES", reference="https://arxiv.org/abs/2306.01708",
                   prune="magnitude", sign_election=True, default_normalize=True, default_rescale=False),
    TaskArithmetic(name="dare_ties", title="DARE TIES", reference=_DARE,
                   prune="random", sign_election=True, default_normalize=False, default_rescale=True),
    TaskArithmetic(name="dare_linear", title="Linear DARE", reference=_DARE,
                   prune="random", sign_election=False, default_normalize=False, default_rescale=True),
    TaskArithmetic(name="breadcrumbs", title="Model Breadcrumbs", reference=_BREADCRUMBS,
                   prune="magnitude_outliers", sign_election=False, default_normalize=False, default_rescale=False),
    TaskArithmetic(name="breadcrumbs_ties", title="Model Breadcrumbs with TIES", reference=_BREADCRUMBS,
                   prune="magnitude_outliers", sign_election=True, default_normalize=False, default_rescale=False),
    TaskArithmetic(name="della", title="DELLA", reference=_DELLA,
                   prune="della_magprune", sign_election=True, default_normalize=True, default_rescale=True),
    TaskArithmetic(name="della_linear", title="Linear DELLA", reference=_DELLA,
                   prune="della_magprune", sign_election=False, default_normalize=False, default_rescale=True),
)
