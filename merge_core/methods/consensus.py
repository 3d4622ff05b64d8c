"""Task-vector merges that weigh models by agreement rather than by a user weight:
SCE (select by variance, calculate weights from energy, erase minority signs) and RAM /
RAM+ (average where several models changed a parameter, keep single contributions whole)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_core.methods.base import KEEP_ALL_SEARCH, MergeParams, MethodInfo, Param, Scope, compute_dtype


def _task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    work = compute_dtype(base)
    ref = base.to(work)
    return ref, torch.stack([x.to(work) - ref for x in tensors])              # [n, *shape]


@dataclass(frozen=True)
class Sce(MethodInfo):

    @property
    def params(self) -> tuple[Param, ...]:
        return (
            Param("select_topk", float, Scope.SHARED, 1.0,
                  "fraction of entries kept: those where the models' deltas vary most", search=KEEP_ALL_SEARCH),
            Param("int8_mask", bool, Scope.SHARED, False, "accepted for mergekit compatibility; no effect"),
        )

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        assert base is not None  # guaranteed by the plan (BasePolicy.REQUIRED)
        ref, tvs = _task_vectors(base, tensors)
        topk = float(params.shared["select_topk"])
        if topk < 1:
            tvs = tvs * _variance_mask(tvs, topk).unsqueeze(0)
        majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1               # ties count positive
        agree = (tvs.sign() == majority).to(tvs.dtype)
        energy = tvs.square().reshape(len(tensors), -1).mean(dim=1)            # [n]
        total = energy.sum().item()
        share = torch.ones_like(energy) / len(tensors) if abs(total) < 1e-6 else energy / total
        share = share.view(-1, *([1] * (tvs.dim() - 1))) * agree
        merged = (tvs * share).sum(dim=0) / share.sum(dim=0).clamp(min=1e-6)
        return (ref + merged).to(base.dtype)


def _variance_mask(tvs: torch.Tensor, density: float) -> torch.Tensor:
    """1 where the deltas' variance across models is among the top ``density`` of the
    entries that vary at all, else 0."""
    if density <= 0:
        return torch.zeros_like(tvs[0])
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * density)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


@dataclass(frozen=True)
class Ram(MethodInfo):
    plus: bool                    # RAM+: boost single contributions of models that overlap little

    @property
    def params(self) -> tuple[Param, ...]:
        eps = Param("epsilon", float, Scope.SHARED, 1e-5, "a delta counts as a change above this")
        if not self.plus:
            return (eps,)
        return (Param("r", float, Scope.SHARED, 0.1, "strength of the boost of unique changes"),
                Param("alpha", float, Scope.SHARED, 0.2, "cap on the shared/unique ratio"),
                eps)

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        assert base is not None  # guaranteed by the plan (BasePolicy.REQUIRED)
        eps = float(params.shared["epsilon"])
        ref, tvs = _task_vectors(base, tensors)
        flat = tvs.reshape(len(tensors), -1)                                   # [n, numel]
        changed = flat.abs() > eps
        counts = changed.sum(dim=0, keepdim=True)                              # [1, numel]
        shared, unique = counts > 1, counts == 1
        kept = flat * changed
        solo = kept * unique
        if self.plus:
            ratio = (changed & shared).sum(dim=1) / (changed & unique).sum(dim=1).clamp(min=eps)
            boost = 1 + float(params.shared["r"]) * ratio.clamp(min=0, max=float(params.shared["alpha"]))
            solo = solo * boost.unsqueeze(-1)
        merged = (solo + kept * shared / counts.clamp(min=1)).sum(dim=0)
        return (ref + merged.reshape(base.shape)).to(base.dtype)


_RAM = "https://arxiv.org/abs/2601.13572"
METHODS = (
    Sce(name="sce", title="SCE", reference="https://arxiv.org/abs/2408.07990"),
    Ram(name="ram", title="Reinforced Agent Merging", reference=_RAM, plus=False),
    Ram(name="ramplus_tl", title="Reinforced Agent Merging Plus (Tensor-Local)", reference=_RAM, plus=True),
)
