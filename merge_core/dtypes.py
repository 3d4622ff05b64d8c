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


# The dtypes the live model and the evaluator may run in; "auto" first as the default.
COMPUTE_DTYPES: tuple[str, ...] = ("auto", "bfloat16", "float16", "float32")


def compute_dtype(requested: str, *, checkpoint_dtype: torch.dtype | str | None,
                  device: str | torch.device) -> torch.dtype:
    """The dtype the live model and the evaluator's KV cache run in.

    ``auto`` is the base checkpoint's dtype on CUDA (float32 when the checkpoint is float32,
    not a float16/bfloat16, or unknown) and float32 anywhere else: CPU results stay what they
    were, and a half-precision checkpoint runs on tensor cores on the GPU. ``bfloat16``,
    ``float16`` and ``float32`` are taken as given. ``checkpoint_dtype`` may be a torch dtype,
    a torch name (``"bfloat16"``) or a safetensors spelling (``"BF16"``).
    """
    import torch

    from .errors import BrmergeError

    if requested not in COMPUTE_DTYPES:
        raise BrmergeError(f"compute dtype {requested!r} is not one of "
                           f"{', '.join(COMPUTE_DTYPES)}: pick one (auto = the checkpoint's "
                           "dtype on CUDA, float32 on CPU)")
    if requested != "auto":
        return torch_dtype(requested)
    if torch.device(device).type != "cuda":
        return torch.float32
    ck = checkpoint_dtype
    if isinstance(ck, str):
        d = _BY_NAME.get(ck) or _BY_SAFETENSORS.get(ck)
        ck = torch_dtype(d.name) if d is not None and d.name in _torch_by_name() else None
    if ck in (torch.bfloat16, torch.float16):
        return ck
    return torch.float32
