"""Linear (weighted average) merging: Wortsman et al., "Model soups", 2022."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_core.methods.base import (WEIGHT_SEARCH, BasePolicy, MergeParams, MethodInfo,
                                     Param, Scope, compute_dtype)


@dataclass(frozen=True)
class Linear(MethodInfo):

    @property
    def params(self) -> tuple[Param, ...]:
        return (
            Param("weight", float, Scope.INPUT, doc="coefficient of each input", search=WEIGHT_SEARCH),
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


METHODS = (Linear(name="linear", title="Linear", reference="https://arxiv.org/abs/2203.05482",
                  base=BasePolicy.IGNORED),)
