"""Model Stock: Jang et al., 2024 — interpolate the average of fine-tunes toward the
base by a ratio derived from the angle between their task vectors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_core.methods.base import MergeParams, MethodInfo, Param, Scope, compute_dtype


@dataclass(frozen=True)
class ModelStock(MethodInfo):

    @property
    def params(self) -> tuple[Param, ...]:
        return (Param("filter_wise", bool, Scope.SHARED, False, "one ratio per row instead of per tensor"),)

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        assert base is not None  # guaranteed by the plan (BasePolicy.REQUIRED)
        work = compute_dtype(base)
        shape = base.shape
        w0 = base.to(work)
        ws = [x.to(work) for x in tensors]
        if params.shared["filter_wise"]:
            if w0.dim() == 1:
                w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
        else:
            w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
        offsets = [w - w0 for w in ws]
        cosines = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1:]:
                norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)             # [rows, 1] or [1]
        n = len(ws)
        denom = 1 + (n - 1) * cos
        # no finite ratio at the singularity: keep the base there, as mergekit does
        singular = denom.abs() < 1e-6
        ratio = torch.where(singular, torch.zeros_like(cos),
                            n * cos / torch.where(singular, torch.ones_like(denom), denom))
        average = sum(ws) / n
        return (ratio * average + (1 - ratio) * w0).reshape(shape).to(base.dtype)


METHODS = (ModelStock(name="model_stock", title="Model Stock", reference="https://arxiv.org/abs/2403.19522",
                      min_models=2),)
