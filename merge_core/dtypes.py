"""The one table of tensor dtypes: torch's names, safetensors' spellings, and which a recipe
may ask for.

Importing this module does not import torch (the recipe is parsed before torch loads); the
functions that return ``torch.dtype`` objects import it when first called.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    name: str          # torch's attribute and a recipe's spelling: "bfloat16"
    safetensors: str   # the safetensors header's spelling: "BF16"
    recipe: bool       # a recipe may name it as dtype / out_dtype (a float the merge computes in)


TABLE: tuple[DType, ...] = (
    DType("float32", "F32", True),
    DType("float16", "F16", True),
    DType("bfloat16", "BF16", True),
    DType("float64", "F64", True),
    DType("int64", "I64", False),
    DType("int32", "I32", False),
    DType("int16", "I16", False),
    DType("int8", "I8", False),
    DType("uint8", "U8", False),
    DType("bool", "BOOL", False),
    DType("float8_e4m3fn", "F8_E4M3", False),   # only where this torch has it
    DType("float8_e5m2", "F8_E5M2", False),
)

RECIPE_DTYPES: tuple[str, ...] = tuple(d.name for d in TABLE if d.recipe)
_BY_SAFETENSORS = {d.safetensors: d for d in TABLE}
_BY_NAME = {d.name: d for d in TABLE}


def recipe_dtype_of(code: str) -> str | None:
    """A safetensors spelling as a recipe's dtype name (``"BF16"`` -> ``"bfloat16"``); None
    for a dtype a recipe cannot name (integers, float8, unknown spellings)."""
    d = _BY_SAFETENSORS.get(code)
    return d.name if d is not None and d.recipe else None


@cache
def _torch_by_name() -> dict[str, torch.dtype]:
    import torch

    return {d.name: getattr(torch, d.name) for d in TABLE if hasattr(torch, d.name)}


@cache
def _safetensors_by_torch() -> dict[torch.dtype, str]:
    return {dtype: _BY_NAME[name].safetensors for name, dtype in _torch_by_name().items()}


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (KeyError for a name this table lacks)."""
    return _torch_by_name()[name]


def from_safetensors(code: str) -> torch.dtype:
    """``"BF16"`` -> ``torch.bfloat16`` (KeyError for a spelling this table or torch lacks)."""
    return _torch_by_name()[_BY_SAFETENSORS[code].name]


def to_safetensors(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"BF16"``; for a dtype the table lacks, torch's own name."""
    return _safetensors_by_torch().get(dtype, str(dtype))
