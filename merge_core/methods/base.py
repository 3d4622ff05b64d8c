"""The merge-method seam: parameter declarations and the tensor function.

A method is a small frozen object with a ``name``, its parameter definitions and a
pure ``merge`` function. Parameters follow mergekit's names and scopes so that a
mergekit recipe means the same thing here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, runtime_checkable

import torch

REQUIRED: Any = object()


class Scope(str, Enum):
    SHARED = "shared"      # one value for the whole tensor (e.g. ``normalize``, ``t``)
    MODEL = "model"        # one value per non-base input (e.g. ``weight``, ``density``)
    INPUT = "input"        # one value per input, the base included (e.g. linear ``weight``)


class BasePolicy(str, Enum):
    REQUIRED = "required"
    OPTIONAL = "optional"
    IGNORED = "ignored"    # the base, if named, is just one more input


@dataclass(frozen=True)
class Param:
    name: str
    kind: type              # float, bool or int
    scope: Scope
    default: Any = REQUIRED
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def coerce(self, value: Any, *, where: str) -> Any:
        """Validate one resolved value; ``where`` names the tensor/model for errors."""
        from merge_core.errors import RecipeError

        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise RecipeError(f"parameter {self.name!r} at {where} must be true or false, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise RecipeError(f"parameter {self.name!r} at {where} must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise RecipeError(f"parameter {self.name!r} at {where} must be a number, got {value!r}") from None
        return int(number) if self.kind is int else number


@dataclass(frozen=True)
class MergeParams:
    """Resolved parameters for one output tensor.

    ``models[i]`` holds the per-model values of ``tensors[i]`` as passed to ``merge``.
    """

    shared: Mapping[str, Any] = field(default_factory=dict)
    models: Sequence[Mapping[str, Any]] = ()


@runtime_checkable
class MergeMethod(Protocol):
    name: str
    title: str
    reference: str | None
    base: BasePolicy
    randomized: bool
    min_models: int          # non-base inputs needed
    max_models: int | None

    @property
    def params(self) -> tuple[Param, ...]: ...

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        """Merge one tensor. ``base`` is None when the method ignores or lacks a base.

        Pure and deterministic: randomized methods draw from ``seed`` only (derived
        per tensor name by the caller), so order and device do not matter.

        A method whose class sets ``writes_out = True`` also takes ``out=``: a
        contiguous tensor of the base's dtype and numel to write the result into (the
        resident merge passes the live parameter, saving an allocation and a copy).
        """
        ...


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Arithmetic in float32 (float64 stays float64): bf16/fp16 sums lose too much.
    return torch.float64 if t.dtype == torch.float64 else torch.float32
