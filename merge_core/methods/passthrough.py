"""Passthrough: copy one input tensor, optionally scaled. With ``slices`` it stacks
layers from several models (frankenmerges)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_core.methods.base import BasePolicy, MergeParams, MethodInfo, Param, Scope


@dataclass(frozen=True)
class Passthrough(MethodInfo):

    @property
    def params(self) -> tuple[Param, ...]:
        return (Param("scale", float, Scope.INPUT, None, "multiply the tensor by this"),)

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        scale = params.models[0].get("scale")
        return tensors[0] if scale is None else tensors[0] * float(scale)


METHODS = (Passthrough(name="passthrough", title="Passthrough", base=BasePolicy.IGNORED, max_models=1),)
