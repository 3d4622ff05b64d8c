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
from merge_core.dtypes import recipe_dtype_of
from merge_core.errors import MergeError, RecipeError
from merge_core.methods.base import BasePolicy, Scope
from merge_core.recipe import FrozenMap, Recipe, evaluate_setting
from merge_core.vocab import VocabPlan, is_vocab_tensor

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


def stack_of(name: str) -> str | None:
    """The layer stack a tensor belongs to: its name up to the layer index
    (``model.layers.``, or in a multimodal wrapper ``language_model.model.layers.`` and
    ``vision_tower.vision_model.encoder.layers.``); None outside the layers."""
    m = _LAYER.search(name)
    return name[: m.start(1)] if m else None


# Sub-configs of multimodal wrappers, matched by a word in the stack's name; any other stack
# is the language model's, whose config is the top level or ``text_config``.
_TOWER_CONFIGS = (("vision", "vision_config"), ("audio", "audio_config"))
_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _config_count(config: Mapping[str, Any]) -> int | None:
    return next((int(config[k]) for k in _COUNT_KEYS if isinstance(config.get(k), int)), None)


def stack_config(config: Mapping[str, Any], stack: str | None) -> Mapping[str, Any]:
    """The (sub-)config that describes ``stack``: a tower's own, else the language model's."""
    for word, key in _TOWER_CONFIGS:
        if stack is not None and word in stack and isinstance(config.get(key), Mapping):
            return config[key]
    if _config_count(config) is None and isinstance(config.get("text_config"), Mapping):
        return config["text_config"]
    return config


def is_tower(stack: str | None) -> bool:
    return stack is not None and any(word in stack for word, _ in _TOWER_CONFIGS)


def stack_layers(config: Mapping[str, Any], names: Sequence[str], stack: str) -> int:
    """How many layers ``stack`` has: its config's count, else the highest index in ``names``."""
    count = _config_count(stack_config(config, stack))
    if count is not None:
        return count
    found = [layer_of(n) for n in names if stack_of(n) == stack]
    return max((i for i in found if i is not None), default=-1) + 1


def num_layers(config: Mapping[str, Any], names: Sequence[str]) -> int:
    """The language model's layers (the ones per-layer parameters and the search address)."""
    count = _config_count(stack_config(config, None))
    if count is not None:
        return count
    found = [layer_of(n) for n in names if not is_tower(stack_of(n))]
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
    # With ``slices``: output layer i is layer layer_sources[i][1] of model layer_sources[i][0]
    # (the slice's first source), for the config's per-layer settings. Empty otherwise.
    layer_sources: tuple[tuple[str, int], ...] = ()
    # Embedding and head rows aligned by token string (tokenizer_source / tokenizer block).
    vocab: VocabPlan | None = None




# An output head tied to the token embedding: a model that did not save the head (its config
# ties them) gives its embedding instead, as mergekit reads a tied weight. Families whose
# mergekit architecture has no separate head (Gemma 1 always ties) drop a saved head.
TIED_HEADS: dict[str, tuple[str, ...]] = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight",
                       "model.language_model.embed_tokens.weight"),
}
_NO_HEAD_TYPES = ("gemma",)


def tied_input(name: str, names: Mapping[str, Any] | Sequence[str]) -> str | None:
    """The tensor a model gives for ``name``: itself, else the embedding a head is tied to."""
    if name in names:
        return name
    return next((e for e in TIED_HEADS.get(name, ()) if e in names), None)


# Input-side tensors outside the layers (token and position embeddings): taken from the first
# slice of a stack, as mergekit's pre-weights are; everything else outside the layers comes last.
_INPUT_SIDE = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings")


def _sort_key(name: str) -> tuple[int, int, str]:
    layer = layer_of(name)
    if layer is not None:
        return (1, layer, name)
    return (0 if any(k in name for k in _INPUT_SIDE) else 2, 0, name)


def build_plan(recipe: Recipe, *, infos: Mapping[str, Mapping[str, HasShape]],
               configs: Mapping[str, Mapping[str, Any]], vocab: VocabPlan | None = None) -> MergePlan:
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
    names = set(infos[reference])
    for head in TIED_HEADS:
        if configs.get(reference, {}).get("model_type") in _NO_HEAD_TYPES:
            names.discard(head)
        elif any(head in infos[r] for r in recipe.referenced_models()):
            names.add(head)
    ref_names = sorted(names, key=_sort_key)
    # Layer stacks: the language model's, which slices and per-layer parameters address, and in
    # multimodal wrappers the towers (vision, audio), each planned with its own layer count.
    towers = sorted({st for n in ref_names if is_tower(st := stack_of(n))})
    layer_names = [n for n in ref_names if layer_of(n) == 0 and not is_tower(stack_of(n))]  # one layer
    outside = [n for n in ref_names if layer_of(n) is None]
    main_root = layer_names[0].split(".")[0] if towers and layer_names else None

    def input_side(name: str) -> bool:
        # With towers, everything outside the language model (towers, projector) feeds its input.
        return _sort_key(name)[0] == 0 or (main_root is not None and name.split(".")[0] != main_root)

    pre = [n for n in outside if input_side(n)]
    post = [n for n in outside if not input_side(n)]

    out_dtype_name = recipe.out_dtype or recipe.dtype
    plans: list[TensorPlan] = []

    def plan_tensor(out_name: str, sources: Sequence[tuple[str, str, FrozenMap]], base: str | None,
                    slice_params: FrozenMap, t: float, layer: int | None) -> None:
        uses_base = method.base is not BasePolicy.IGNORED and base is not None
        base_index = None
        inputs = []
        models = []
        for ref, in_name, params in sources:
            in_name = tied_input(in_name, infos[ref]) or in_name
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
        ref_info = infos[inputs[0][0]][inputs[0][1]]
        shape = tuple(ref_info.shape)
        if vocab is not None and is_vocab_tensor(out_name):
            shape = (vocab.size, *shape[1:])
        out_dtype = out_dtype_name or (recipe_dtype_of(ref_info.dtype) or "float32")
        shared = resolve((slice_params, recipe.parameters), tensor=out_name, t=t, names=shared_names,
                         where="parameters")
        plans.append(TensorPlan(name=out_name, shape=shape, out_dtype=out_dtype, inputs=tuple(inputs),
                                base_index=base_index, shared=shared, models=tuple(models),
                                seed=rng.derive_seed(recipe.seed, out_name), layer=layer))

    first_sources, _, first_base, first_params = slices[0]
    for name in pre:
        plan_tensor(name, [(r, name, p) for r, _, p in first_sources], first_base, first_params, 0.0, None)
    # Towers: every layer, from the first slice's models; per-layer lists spread over the
    # tower's own depth, as mergekit does per module. ``layer`` stays None: it counts the
    # language model's layers only.
    ref_config = configs.get(reference, {})
    for tower in towers:
        depth = stack_layers(ref_config, list(infos[reference]), tower)
        template = [n for n in ref_names if stack_of(n) == tower and layer_of(n) == 0]
        for i in range(depth):
            t = i / (depth - 1) if depth > 1 else 1.0
            for name in template:
                out_name = with_layer(name, i)
                plan_tensor(out_name, [(r, out_name, p) for r, _, p in first_sources], first_base,
                            first_params, t, None)
    out_layer = 0
    layer_sources: list[tuple[str, int]] = []
    for sources, length, base, slice_params in slices:
        for offset in range(length):
            layer_sources.append((sources[0][0], sources[0][1] + offset))
            t = offset / (length - 1) if length > 1 else 1.0
            for template in layer_names:
                out_name = with_layer(template, out_layer)
                plan_tensor(out_name, [(r, with_layer(template, start + offset), p) for r, start, p in sources],
                            base, slice_params, t, out_layer)
            out_layer += 1
    last_sources, _, last_base, last_params = slices[-1]
    for name in post:
        plan_tensor(name, [(r, name, p) for r, _, p in last_sources], last_base, last_params, 0.0, None)

    tok = recipe.vocabulary_source()
    tokenizer_source = reference if tok in (None, "base", "union") else tok
    return MergePlan(method=method.name, tensors=tuple(plans), compute_dtype=recipe.dtype,
                     config_source=reference, tokenizer_source=tokenizer_source, num_layers=out_layer,
                     chat_template=recipe.chat_template,
                     layer_sources=tuple(layer_sources) if recipe.slices else (), vocab=vocab)
