"""Which output tensor comes from which inputs with which parameters (pure).

``build_plan`` turns a recipe plus the tensor headers and configs of its models into a
frozen, hashable ``MergePlan``; nothing here touches a device or a file. Per-layer
parameters use mergekit's rule: layer ``i`` of an ``n``-layer slice sits at depth
``t = i / (n - 1)``; tensors outside the layers (embeddings, final norm, head) use ``t = 0``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from merge_core import rng
from merge_core.errors import MergeError, RecipeError
from merge_core.methods.base import BasePolicy, Scope
from merge_core.recipe import FrozenMap, Recipe, evaluate_setting

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


class HasShape(Protocol):
    shape: tuple[int, ...]
    dtype: str


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def with_layer(name: str, layer: int) -> str:
    m = _LAYER.search(name)
    if m is None:
        return name
    return name[: m.start(1)] + str(layer) + name[m.end(1):]


def num_layers(config: Mapping[str, Any], names: Sequence[str]) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    found = [layer_of(n) for n in names]
    return max((i for i in found if i is not None), default=-1) + 1


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: inputs as (model ref, tensor name), the base position among
    them (None when the method has no base), resolved parameters, and its seed."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str                      # "float32", "bfloat16", ...
    inputs: tuple[tuple[str, str], ...]
    base_index: int | None
    shared: FrozenMap
    models: tuple[FrozenMap, ...]       # aligned with the non-base inputs, in order
    seed: int
    layer: int | None


@dataclass(frozen=True)
class MergePlan:
    method: str
    tensors: tuple[TensorPlan, ...]
    compute_dtype: str | None           # inputs are cast to this first (recipe ``dtype``)
    config_source: str                  # model whose config.json the output copies
    tokenizer_source: str
    num_layers: int
    chat_template: str | None = None    # the recipe's value: a name, "auto" or a Jinja string


_ST_TO_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _sort_key(name: str) -> tuple[int, int, str]:
    layer = layer_of(name)
    if layer is not None:
        return (1, layer, name)
    return (0 if "embed" in name or "wte" in name else 2, 0, name)


def build_plan(recipe: Recipe, *, infos: Mapping[str, Mapping[str, HasShape]],
               configs: Mapping[str, Mapping[str, Any]]) -> MergePlan:
    method = recipe.method()
    known = {p.name: p for p in method.params}
    for ref in recipe.referenced_models():
        if ref not in infos:
            raise MergeError(f"no tensor headers for model {ref!r}")

    def resolve(scopes: Sequence[Mapping[str, Any]], *, tensor: str, t: float, names: Sequence[str],
                where: str) -> FrozenMap:
        out = {}
        for pname in names:
            spec = known[pname]
            value = None
            for scope in scopes:
                if pname in scope:
                    value = evaluate_setting(scope[pname], tensor_name=tensor, t=t)
                    if value is not None:
                        break
            if value is None:
                if spec.required:
                    raise RecipeError(f"parameter {pname!r} is missing for {where} (tensor {tensor}): "
                                      f"set it under that model's parameters or the top-level parameters")
                out[pname] = spec.default
            else:
                out[pname] = spec.coerce(value, where=f"{where} {tensor}")
        return FrozenMap(out)

    shared_names = [p.name for p in method.params if p.scope is Scope.SHARED]
    input_names = [p.name for p in method.params if p.scope in (Scope.MODEL, Scope.INPUT)]

    # Normalise both recipe styles into output slices of (ref, first_layer, params).
    if recipe.models:
        refs = [(m.model, m.parameters) for m in recipe.models]
        if recipe.base_model and recipe.base_model not in [r for r, _ in refs]:
            refs.append((recipe.base_model, FrozenMap()))  # mergekit adds an unlisted base
        first = refs[0][0] if not recipe.base_model else recipe.base_model
        n = num_layers(configs.get(first, {}), list(infos[first]))
        slices = [(tuple((r, 0, p) for r, p in refs), n, recipe.base_model, FrozenMap())]
    else:
        slices = []
        for s in recipe.slices:
            length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            slices.append((tuple((src.model, src.layer_range[0], src.parameters) for src in s.sources),
                           length, s.base_model or recipe.base_model, s.parameters))

    reference = recipe.base_model or slices[0][0][0][0]
    ref_names = sorted(infos[reference], key=_sort_key)
    layer_names = [n for n in ref_names if layer_of(n) == 0]  # template of one layer
    pre = [n for n in ref_names if layer_of(n) is None and _sort_key(n)[0] == 0]
    post = [n for n in ref_names if layer_of(n) is None and _sort_key(n)[0] == 2]

    out_dtype_name = recipe.out_dtype or recipe.dtype
    plans: list[TensorPlan] = []

    def plan_tensor(out_name: str, sources: Sequence[tuple[str, str, FrozenMap]], base: str | None,
                    slice_params: FrozenMap, t: float, layer: int | None) -> None:
        uses_base = method.base is not BasePolicy.IGNORED and base is not None
        base_index = None
        inputs = []
        models = []
        for ref, in_name, params in sources:
            info = infos[ref].get(in_name)
            if info is None:
                raise MergeError(f"model {ref!r} has no tensor {in_name!r} (needed for {out_name}): "
                                 "are all models of the same architecture and size?")
            inputs.append((ref, in_name))
            is_base = uses_base and ref == base
            if is_base:
                base_index = len(inputs) - 1
                continue
            models.append(resolve((params, slice_params, recipe.parameters), tensor=in_name, t=t,
                                  names=input_names,
                                  where=f"model {ref!r}"))
        if method.base is BasePolicy.REQUIRED and base_index is None:
            raise MergeError(f"base model {base!r} is not among the inputs of {out_name}")
        ref_info = infos[sources[0][0]][sources[0][1]]
        shape = tuple(ref_info.shape)
        out_dtype = out_dtype_name or _ST_TO_NAME.get(ref_info.dtype, "float32")
        shared = resolve((slice_params, recipe.parameters), tensor=out_name, t=t, names=shared_names,
                         where="parameters")
        plans.append(TensorPlan(name=out_name, shape=shape, out_dtype=out_dtype, inputs=tuple(inputs),
                                base_index=base_index, shared=shared, models=tuple(models),
                                seed=rng.derive_seed(recipe.seed, out_name), layer=layer))

    first_sources, _, first_base, first_params = slices[0]
    for name in pre:
        plan_tensor(name, [(r, name, p) for r, _, p in first_sources], first_base, first_params, 0.0, None)
    out_layer = 0
    for sources, length, base, slice_params in slices:
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            for template in layer_names:
                out_name = with_layer(template, out_layer)
                plan_tensor(out_name, [(r, with_layer(template, start + offset), p) for r, start, p in sources],
                            base, slice_params, t, out_layer)
            out_layer += 1
    last_sources, _, last_base, last_params = slices[-1]
    for name in post:
        plan_tensor(name, [(r, name, p) for r, _, p in last_sources], last_base, last_params, 0.0, None)

    tok = recipe.tokenizer_source
    tokenizer_source = reference if tok in (None, "base") else tok
    return MergePlan(method=method.name, tensors=tuple(plans), compute_dtype=recipe.dtype,
                     config_source=reference, tokenizer_source=tokenizer_source, num_layers=out_layer,
                     chat_template=recipe.chat_template)
