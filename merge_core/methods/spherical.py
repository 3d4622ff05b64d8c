"""Spherical interpolation: SLERP (two models) and NuSLERP (two models, optional base)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_core.methods.base import (NON_NEGATIVE_SEARCH, WEIGHT_SEARCH, BasePolicy, MergeParams,
                                     MethodInfo, Param, Scope, compute_dtype)

DOT_THRESHOLD = 0.9995  # nearly colinear rows fall back to linear interpolation (mergekit's value)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """SLERP between whole tensors, treating each as one flat vector."""
    work = compute_dtype(v0)
    a = v0.reshape(-1).to(work)
    b = v1.reshape(-1).to(work)
    if a.numel() == 0:
        return v0.clone()
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = torch.dot(a / na, b / nb).clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        out = (1 - t) * a + t * b
    else:
        theta = torch.acos(dot)
        s = torch.sin(theta)
        out = (torch.sin((1 - t) * theta) / s) * a + (torch.sin(t * theta) / s) * b
    return out.reshape(v0.shape).to(v0.dtype)


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool,
            eps: float = 1e-8) -> torch.Tensor:
    """SLERP over rows (``row_wise``), columns, or the whole flattened tensor."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = (unit(v0) * unit(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / s
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@dataclass(frozen=True)
class Slerp(MethodInfo):

    @property
    def params(self) -> tuple[Param, ...]:
        return (Param("t", float, Scope.SHARED, doc="0 gives the base, 1 the other model",
                      search=NON_NEGATIVE_SEARCH),)

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        assert base is not None  # guaranteed by the plan (BasePolicy.REQUIRED)
        return slerp(float(params.shared["t"]), base, tensors[0])


@dataclass(frozen=True)
class NuSlerp(MethodInfo):

    @property
    def params(self) -> tuple[Param, ...]:
        return (
            Param("weight", float, Scope.MODEL, doc="relative weight; t = w1 / (w0 + w1)", search=WEIGHT_SEARCH),
            Param("nuslerp_row_wise", bool, Scope.SHARED, False, "SLERP rows, not columns"),
            Param("nuslerp_flatten", bool, Scope.SHARED, True, "SLERP the whole tensor as one vector"),
        )

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        w0, w1 = (float(p["weight"]) for p in params.models)
        total = w0 + w1
        t = 0.5 if abs(total) < 1e-6 else w1 / total
        row_wise = bool(params.shared["nuslerp_row_wise"])
        flatten = bool(params.shared["nuslerp_flatten"])
        work = compute_dtype(tensors[0])
        a, b = (x.to(work) for x in tensors)
        if base is not None:
            ref = base.to(work)
            out = ref + nuslerp(t, a - ref, b - ref, row_wise=row_wise, flatten=flatten)
        else:
            out = nuslerp(t, a, b, row_wise=row_wise, flatten=flatten)
        return out.to(tensors[0].dtype)


_SLERP = "https://en.wikipedia.org/wiki/Slerp"
METHODS = (
    Slerp(name="slerp", title="SLERP", reference=_SLERP, max_models=1),
    NuSlerp(name="nuslerp", title="NuSLERP", reference=_SLERP, base=BasePolicy.OPTIONAL,
            min_models=2, max_models=2),
)
