"""Passthrough: copy one input tensor, optionally scaled. With ``slices`` it stacks
layers from several models (frankenmerges)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_core.methods.base import BasePolicy, MergeParams, Param, Scope


@dataclass(frozen=True)
class Passthrough:
    name: str = "passthrough"
    title: str = "Passthrough"
    reference: str | None = None
    base: BasePolicy = BasePolicy.IGNORED
    randomized: bool = False
    writes_out: bool = False      # merge takes no out= (see base.MergeMethod)
    min_models: int = 1
    max_models: int | None = 1

    @property
    def params(self) -> tuple[Param, ...]:
        return (Param("scale", float, Scope.INPUT, None, "multiply the tensor by this"),)

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        scale = params.models[0].get("scale")
        return tensors[0] if scale is None else tensors[0] * float(scale)


METHODS = (Passthrough(),)
