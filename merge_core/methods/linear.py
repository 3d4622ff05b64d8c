"""Linear (weighted average) merging: Wortsman et al., "Model soups", 2022."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_core.methods.base import BasePolicy, MergeParams, Param, Scope, compute_dtype


@dataclass(frozen=True)
class Linear:
    name: str = "linear"
    title: str = "Linear"
    reference: str | None = "https://arxiv.org/abs/2203.05482"
    base: BasePolicy = BasePolicy.IGNORED
    randomized: bool = False
    writes_out: bool = False      # merge takes no out= (see base.MergeMethod)
    min_models: int = 1
    max_models: int | None = None

    @property
    def params(self) -> tuple[Param, ...]:
        return (
            Param("weight", float, Scope.INPUT, doc="coefficient of each input"),
            Param("normalize", bool, Scope.SHARED, True, "divide by the sum of weights"),
        )

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        first = tensors[0]
        work = compute_dtype(first)
        out = torch.zeros(first.shape, dtype=work, device=first.device)
        weights = [float(p["weight"]) for p in params.models]
        for tensor, w in zip(tensors, weights):
            out.add_(tensor.to(work), alpha=w)
        total = sum(weights)
        # A zero total would divide by zero (mergekit yields inf/NaN); keep the raw sum.
        if params.shared["normalize"] and abs(total) > 1e-8:
            out.div_(total)
        return out.to(first.dtype)


METHODS = (Linear(),)
