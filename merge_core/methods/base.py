"""The merge-method seam: parameter declarations and the tensor function.

A method is a small frozen object with a ``name``, its parameter definitions, its
capabilities and a pure ``merge`` function. Parameters follow mergekit's names and scopes
so that a mergekit recipe means the same thing here.

Importing this module does not import torch: the registry and the recipe use it before
torch loads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
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
class Search:
    """What a merge search needs to know of a parameter it may set (``Param.search``).

    ``low``/``high``: the widest range a campaign may search (``inf`` for no bound);
    ``neutral``: its value in the baselines (the uniform merge; a model alone), ``None`` for
    the middle of the searched range; ``selects_model``: the baselines single a model out by
    giving it ``neutral`` here and every other model 0 (a model's weight).
    """

    low: float = 0.0
    high: float = 1.0
    neutral: float | None = None
    selects_model: bool = False

    def __post_init__(self) -> None:
        # a method author's slip, caught when the method's file is imported
        if not self.low < self.high:
            raise TypeError(f"Search low {self.low} must be below high {self.high}")
        if self.neutral is not None and not self.low <= self.neutral <= self.high:
            raise TypeError(f"Search neutral {self.neutral} must lie within [{self.low}, {self.high}]")
        if self.selects_model and not self.neutral:
            raise TypeError("Search(selects_model=True) needs a non-zero neutral: the value of the model kept")


WEIGHT_SEARCH = Search(-float("inf"), float("inf"), neutral=1.0, selects_model=True)
FRACTION_SEARCH = Search(0.0, 1.0)                 # a share of entries: density, gamma, ...
KEEP_ALL_SEARCH = Search(0.0, 1.0, neutral=1.0)    # a share kept, whose baseline keeps everything
NON_NEGATIVE_SEARCH = Search(0.0, float("inf"))
# a scale of the merged result (``lambda``): its baselines keep the method's own default, 1,
# so the uniform merge is the method's plain result and a model alone is that model
SCALE_SEARCH = Search(0.0, float("inf"), neutral=1.0)


@dataclass(frozen=True)
class Param:
    name: str
    kind: type              # float, bool or int
    scope: Scope
    default: Any = REQUIRED
    doc: str = ""
    search: Search | None = None   # None: a campaign never searches it (see ``Search``)

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


@dataclass(frozen=True, kw_only=True)
class MethodInfo:
    """The capability header of ``MergeMethod``, with the usual values as defaults.

    A method class derives from it (``@dataclass(frozen=True) class Linear(MethodInfo)``) and
    its ``METHODS`` entries name only what differs, e.g. ``Linear(name="linear",
    title="Linear", base=BasePolicy.IGNORED)``. A method need not derive from it: the
    registry checks the members, not the class.
    """

    name: str
    title: str
    reference: str | None = None       # the paper or page the method follows
    base: BasePolicy = BasePolicy.REQUIRED   # most methods merge task vectors against a base
    randomized: bool = False
    writes_out: bool = False           # merge takes no out= unless a method says so
    min_models: int = 1
    max_models: int | None = None


@runtime_checkable
class MergeMethod(Protocol):
    """A merge method, as the registry, the recipe, the plan and the executors see it.

    Adding one: a small file whose ``METHODS`` tuple holds the method objects, and one line
    per method in ``merge_core.methods._METHODS``; ``register`` refuses an object lacking a
    member below (the contract tests then run it).

    Capabilities, declared by every method (no getattr probing):

    - ``randomized``: draws random masks from ``seed`` (the plan derives one per tensor).
    - ``writes_out``: ``merge`` also takes ``out=``, a contiguous tensor of the base's dtype
      and numel to write the result into; the caller only passes it when it fits (the
      resident merge passes the live parameter, saving an allocation and a copy).

    The runtime context (``merge_core.methods.runtime``). ``merge`` is pure in its
    result: the same inputs, parameters and seed give the same bits. How it gets there may
    use three settings that the caller puts in context variables for the duration of a
    merge, instead of arguments (every method and the kernels would otherwise have to pass
    them through):

    - ``runtime.magnitudes``: a ``MagnitudeCache`` of sorted |x - base| for tensors the
      resident merge registered, found by the tensors' memory address (``data_ptr``, numel,
      dtype, device). A method that prunes by magnitude gets its cut-off from it through
      ``sparsify.kth_largest_abs``, which only works when the method passes the caller's
      flat input tensors unchanged (a copy or a cast has another address and misses the
      cache: slower, never wrong).
    - ``runtime.kernel_threads``: how many threads the CPU kernels may use.
    - ``runtime.nonfinite``: a ``NonFiniteTally``; a method that writes ``out`` and counts
      its inf/NaN values on the way records the count under ``out``'s address, and the
      resident merge then skips its own health-check pass over that tensor. A method that
      does not record anything is checked by that pass instead.

    None of these may change a result: a merge run without them (a disk merge, a test) must
    give the same bits.
    """

    name: str
    title: str
    reference: str | None
    base: BasePolicy
    randomized: bool
    writes_out: bool         # merge(..., out=) writes into a caller's tensor (see above)
    min_models: int          # non-base inputs needed
    max_models: int | None

    @property
    def params(self) -> tuple[Param, ...]: ...

    def merge(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor],
              params: MergeParams, *, seed: int = 0) -> torch.Tensor:
        """Merge one tensor. ``base`` is None when the method ignores or lacks a base.

        Pure and deterministic: randomized methods draw from ``seed`` only (derived
        per tensor name by the caller), so order and device do not matter. The runtime
        context (see the class) may make it faster, never different.

        A method that declares ``writes_out = True`` also takes ``out=`` (see the class).
        """
        ...


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Arithmetic in float32 (float64 stays float64): bf16/fp16 sums lose too much.
    import torch

    return torch.float64 if t.dtype == torch.float64 else torch.float32
