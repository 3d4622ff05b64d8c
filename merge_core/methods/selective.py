"""Two-model merges that take the other model's value only where it is close to, or
informative against, the base: NearSwap and Arcee Fusion."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_core.methods.base import NON_NEGATIVE_SEARCH, MergeParams, MethodInfo, Param, Scope, compute_dtype

_IQR_FENCE = 1.5          # Tukey's outlier fence: median + 1.5 * IQR
_KL_EPS = 1e-8            # keeps log(p / q) finite where a softmax underflows


@dataclass(frozen=True)
class NearSwap(MethodInfo):

    @property
    def params(self) -> tuple[Param, ...]:
        return (Param("t", float, Scope.SHARED,
                      doc="entries closer than t take the other model's value; farther ones move t/|diff| of the way",
                      search=NON_NEGATIVE_SEARCH),)

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        assert base is not None  # guaranteed by the plan (BasePolicy.REQUIRED)
        work = compute_dtype(base)
        a, b = base.to(work), tensors[0].to(work)
        share = (float(params.shared["t"]) / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        return (share * b + (1 - share) * a).to(base.dtype)


@dataclass(frozen=True)
class ArceeFusion(MethodInfo):

    @property
    def params(self) -> tuple[Param, ...]:
        return ()

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        assert base is not None  # guaranteed by the plan (BasePolicy.REQUIRED)
        work = compute_dtype(base)
        a, b = base.to(work), tensors[0].to(work)
        delta = b - a
        p = torch.softmax(b, dim=-1) + _KL_EPS
        q = torch.softmax(a, dim=-1) + _KL_EPS
        kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)           # one value per row
        importance = delta.abs() * kl
        q1, median, q3 = _quantiles(importance.reshape(-1), (0.25, 0.5, 0.75))
        keep = (importance >= median + _IQR_FENCE * (q3 - q1)).to(work)
        return (a + delta * keep).to(base.dtype)


def _quantiles(flat: torch.Tensor, qs: Sequence[float]) -> list[torch.Tensor]:
    """The sorted values at positions floor(q * (n - 1)), without sorting (exact, any size)."""
    n = flat.numel()
    return [torch.kthvalue(flat, int(q * (n - 1)) + 1).values for q in qs]


METHODS = (   # both move one fine-tune toward (or away from) its base
    NearSwap(name="nearswap", title="NearSwap", max_models=1,
             reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    ArceeFusion(name="arcee_fusion", title="Arcee Fusion", reference="https://arcee.ai", max_models=1),
)
