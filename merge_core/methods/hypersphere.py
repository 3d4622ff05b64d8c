"""Means on the hypersphere of many models: Multi-SLERP (barycentric interpolation in the
tangent space at the weighted mean direction) and the Karcher mean (iterated to the point
that minimises the weighted squared angles), both rescaled to the weighted mean norm."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from merge_core.errors import MergeError
from merge_core.methods.base import (WEIGHT_SEARCH, BasePolicy, MergeParams, MethodInfo,
                                     Param, Scope, compute_dtype)


@dataclass(frozen=True)
class MultiSlerp(MethodInfo):

    @property
    def params(self) -> tuple[Param, ...]:
        return (
            Param("weight", float, Scope.MODEL, doc="this model's share of the mean direction",
                  search=WEIGHT_SEARCH),
            Param("normalize_weights", bool, Scope.SHARED, True, "divide the weights by their sum"),
            Param("eps", float, Scope.SHARED, 1e-8, "guards divisions by a norm"),
        )

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        if len(tensors) == 1:  # nothing to interpolate, with or without a base
            return tensors[0]
        work = compute_dtype(tensors[0])
        eps = float(params.shared["eps"])
        shape = tensors[0].shape
        ref = base.to(work) if base is not None else None
        xs = torch.stack([x.to(work) - ref if ref is not None else x.to(work) for x in tensors])
        flat = xs.reshape(len(tensors), -1)                                   # [n, numel]
        w = torch.tensor([float(p["weight"]) for p in params.models], dtype=work, device=flat.device)
        if params.shared["normalize_weights"]:
            w = w / w.sum()
        norms = torch.norm(flat, dim=-1, keepdim=True)                        # [n, 1]
        units = flat / (norms + eps)
        mean = (units * w.view(-1, 1)).sum(0)                                 # [numel]
        mean_norm = torch.norm(mean)
        if mean_norm < eps:
            if len(tensors) != 2:
                raise MergeError("multislerp: the weighted directions of the models cancel out "
                                 "(antipodal tensors with balancing weights): change the weights")
            out = flat[0] * w[0] + flat[1] * w[1]   # two antipodal tensors: linear, as mergekit does
        else:
            mean = mean / mean_norm
            dots = (units * mean).sum(-1, keepdim=True)
            tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
            length = torch.norm(tangent) + eps
            out = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
            out = out * (norms.squeeze(-1) * w).sum()
        out = out.reshape(shape)
        if ref is not None:
            out = out + ref
        return out.to(tensors[0].dtype)


@dataclass(frozen=True)
class Karcher(MethodInfo):

    @property
    def params(self) -> tuple[Param, ...]:
        return (
            Param("max_iter", int, Scope.SHARED, 10, "iterations of the fixed-point update"),
            Param("tol", float, Scope.SHARED, 1e-5, "stop when the update is shorter than this"),
        )

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0]
        max_iter, tol = int(params.shared["max_iter"]), float(params.shared["tol"])
        work = compute_dtype(tensors[0])
        xs = [x.to(work).reshape(-1) for x in tensors]
        alphas = [1.0 / len(xs)] * len(xs)        # mergekit's karcher weighs every input equally
        norms = [torch.linalg.vector_norm(x) for x in xs]
        units = [torch.zeros_like(x) if n.item() == 0.0 else x / n for x, n in zip(xs, norms)]
        valid = [i for i, n in enumerate(norms) if n.item() > tol]
        if not valid:
            return torch.zeros_like(tensors[0])
        total = sum(alphas[i] for i in valid)
        shares = [alphas[i] / total for i in valid]
        pts = [units[i] for i in valid]
        mean = torch.zeros_like(pts[0])
        for a, u in zip(shares, pts):
            mean += a * u
        mean_norm = torch.linalg.vector_norm(mean)
        mean = pts[0].clone() if mean_norm.item() < tol else mean / mean_norm
        for _ in range(max_iter):
            tangent = torch.zeros_like(mean)
            for a, u in zip(shares, pts):
                dot = torch.clamp(torch.dot(mean, u), -1.0, 1.0)
                theta = torch.arccos(dot)
                if theta.item() < tol:
                    continue
                tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
            step = torch.linalg.vector_norm(tangent)
            if step.item() < tol:
                break
            mean = torch.cos(step) * mean + torch.sin(step) * (tangent / step)
            unit_norm = torch.linalg.vector_norm(mean)
            if unit_norm.item() > tol:
                mean = mean / unit_norm
        scale = sum(a * n for a, n in zip(alphas, norms))
        return (scale * mean).reshape(tensors[0].shape).to(tensors[0].dtype)


METHODS = (
    MultiSlerp(name="multislerp", title="Multi-SLERP", base=BasePolicy.OPTIONAL,
               reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    Karcher(name="karcher", title="Karcher Mean", reference="https://arxiv.org/abs/2603.04972",
            base=BasePolicy.IGNORED),
)
