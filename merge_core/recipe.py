"""The merge recipe: a frozen, validated model of a mergekit-style YAML.

Reads mergekit recipes (``models`` or ``slices``, ``base_model``, ``merge_method``,
``parameters`` as scalars, per-layer lists or filtered values, ``dtype``,
``out_dtype``, ``tokenizer_source`` or the ``tokenizer`` block, ``chat_template``) and
writes them back. Model references may be ``model+adapter`` (LoRA). brmerge adds one
optional key, ``seed`` (for DARE/DELLA masks), which mergekit ignores.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merge_core import chat_templates, methods, safe_yaml
from merge_core.dtypes import RECIPE_DTYPES
from merge_core.errors import RecipeError, did_you_mean
from merge_core.methods.base import BasePolicy, Scope

DTYPES = RECIPE_DTYPES
_TOP_KEYS = ("models", "slices", "base_model", "merge_method", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "seed", "name")


class FrozenMap(Mapping[str, Any]):
    """An immutable, hashable mapping that keeps insertion order (for YAML round trips)."""

    __slots__ = ("_items", "_dict")

    def __init__(self, items: Mapping[str, Any] | Sequence[tuple[str, Any]] = ()):
        pairs = tuple(items.items()) if isinstance(items, Mapping) else tuple(items)
        self._items = tuple((k, freeze(v)) for k, v in pairs)
        self._dict = dict(self._items)

    def __getitem__(self, key: str) -> Any:
        return self._dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._dict)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __repr__(self) -> str:
        return f"FrozenMap({dict(self._items)!r})"


def freeze(value: Any) -> Any:
    if isinstance(value, FrozenMap):
        return value
    if isinstance(value, Mapping):
        return FrozenMap(value)
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class ModelEntry:
    model: str
    parameters: FrozenMap = field(default_factory=FrozenMap)


@dataclass(frozen=True)
class SliceSource:
    model: str
    layer_range: tuple[int, int]
    parameters: FrozenMap = field(default_factory=FrozenMap)


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    parameters: FrozenMap = field(default_factory=FrozenMap)


@dataclass(frozen=True)
class Recipe:
    merge_method: str
    models: tuple[ModelEntry, ...] = ()
    slices: tuple[OutputSlice, ...] = ()
    base_model: str | None = None
    parameters: FrozenMap = field(default_factory=FrozenMap)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: FrozenMap | None = None          # mergekit's block: source, tokens, pad_to_multiple_of
    chat_template: str | None = None
    seed: int = 0

    # -- reading and writing -------------------------------------------------
    @classmethod
    def from_yaml(cls, text: str, *, source: str = "recipe", check_params: bool = True) -> Recipe:
        # aliases bounded: an alias bomb would make ``freeze`` below walk a billion values
        data = safe_yaml.load(text, source=source, error=RecipeError)
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source}: a recipe is a YAML mapping with merge_method and models or slices")
        return cls.from_dict(data, source=source, check_params=check_params)

    @classmethod
    def from_file(cls, path: str | Path, *, check_params: bool = True) -> Recipe:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file {str(p)!r} not found: check the path")
        text = safe_yaml.read_text(p, error=RecipeError, what="recipe")
        return cls.from_yaml(text, source=str(p), check_params=check_params)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "recipe", check_params: bool = True) -> Recipe:
        """``check_params=False`` reads the structure only (models, slices, the method's name):
        checking parameters and model counts needs the method, whose file imports torch."""
        errors: list[str] = []
        for key in data:
            if key not in _TOP_KEYS:
                if key == "modules":
                    errors.append(f"{key!r} is not supported by brmerge yet: use models or slices")
                else:
                    errors.append(f"unknown key {key!r}{did_you_mean(key, _TOP_KEYS)}")
        method_name = data.get("merge_method")
        if not method_name:
            errors.append("merge_method is missing: name one of " + ", ".join(methods.names()))
        models = tuple(_model_entry(m, i, errors) for i, m in enumerate(data.get("models") or ()))
        slices = tuple(_output_slice(s, i, errors) for i, s in enumerate(data.get("slices") or ()))
        if bool(models) == bool(slices):
            errors.append("give exactly one of models (a list of {model: ...}) or slices")
        for key in ("dtype", "out_dtype"):
            if data.get(key) is not None and data[key] not in DTYPES:
                errors.append(f"{key} {data[key]!r} is not one of {', '.join(DTYPES)}")
        tok = data.get("tokenizer_source")
        if tok is not None and not isinstance(tok, str):
            errors.append(f"tokenizer_source must be base, union or a model reference, got {tok!r}")
        tokenizer = _tokenizer_block(data.get("tokenizer"), errors)
        if tok is not None and tokenizer is not None:
            errors.append("give tokenizer_source or a tokenizer block, not both (tokenizer.source sets the source)")
        template = data.get("chat_template")
        if template is not None:
            if not isinstance(template, str):
                errors.append(f"chat_template must be a template name or a Jinja string, got {template!r}")
            else:
                try:
                    chat_templates.resolve(template)
                except RecipeError as exc:
                    errors.append(str(exc))
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            errors.append(f"seed must be an integer, got {seed!r}")
            seed = 0
        params = data.get("parameters") or {}
        if not isinstance(params, Mapping):
            errors.append("parameters must be a mapping of name: value")
            params = {}
        recipe = cls(
            merge_method=str(method_name),
            models=models,
            slices=slices,
            base_model=_ref(data.get("base_model")),
            parameters=FrozenMap(params),
            dtype=data.get("dtype") if data.get("dtype") in DTYPES else None,
            out_dtype=data.get("out_dtype") if data.get("out_dtype") in DTYPES else None,
            tokenizer_source=_ref(tok),
            tokenizer=tokenizer,
            chat_template=data.get("chat_template"),
            seed=int(seed),
        )
        if method_name and not check_params:
            try:
                methods.check_name(str(method_name))
            except RecipeError as exc:
                errors.append(str(exc))
        elif method_name and (models or slices):
            try:
                errors += recipe.problems()
            except RecipeError as exc:  # unknown method: its own message says it all
                errors.append(str(exc))
        if errors:
            raise RecipeError(f"{source}: " + "; ".join(errors))
        return recipe

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.models:
            out["models"] = [
                {"model": m.model, **({"parameters": thaw(m.parameters)} if m.parameters else {})}
                for m in self.models
            ]
        if self.slices:
            out["slices"] = []
            for s in self.slices:
                d: dict[str, Any] = {"sources": [
                    {"model": src.model, "layer_range": list(src.layer_range),
                     **({"parameters": thaw(src.parameters)} if src.parameters else {})}
                    for src in s.sources
                ]}
                if s.base_model:
                    d["base_model"] = s.base_model
                if s.parameters:
                    d["parameters"] = thaw(s.parameters)
                out["slices"].append(d)
        out["merge_method"] = self.merge_method
        if self.base_model:
            out["base_model"] = self.base_model
        if self.parameters:
            out["parameters"] = thaw(self.parameters)
        if self.tokenizer is not None:
            out["tokenizer"] = thaw(self.tokenizer)
        for key in ("dtype", "out_dtype", "tokenizer_source", "chat_template"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.seed:
            out["seed"] = self.seed
        return out

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_FlowListDumper, sort_keys=False, allow_unicode=True)

    def digest(self) -> str:
        """Content hash: equal for recipes that merge identically (used as a cache key)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()

    # -- structure -------------------------------------------------------------
    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, base first, each once."""
        refs: list[str] = []
        for ref in [self.base_model, *(m.model for m in self.models),
                    *(s.base_model for s in self.slices),
                    *(src.model for s in self.slices for src in s.sources)]:
            if ref and ref not in refs:
                refs.append(ref)
        return refs

    def vocabulary_source(self) -> str | None:
        """base, union or a model: where the output vocabulary comes from when embedding rows
        are aligned by token (``tokenizer_source`` or ``tokenizer.source``); None: no alignment."""
        if self.tokenizer is not None:
            return str(self.tokenizer.get("source", "union"))
        return self.tokenizer_source

    def method(self):
        return methods.get(self.merge_method)

    def validate(self, *, source: str = "recipe") -> None:
        errors = self.problems()
        if errors:
            raise RecipeError(f"{source}: " + "; ".join(errors))

    def problems(self) -> list[str]:
        """Every problem with parameters and model counts, for reporting all at once."""
        method = self.method()
        known = {p.name: p for p in method.params}
        errors: list[str] = []

        def check_params(params: Mapping[str, Any], where: str, *, per_model: bool) -> None:
            for name, setting in params.items():
                if name not in known:
                    errors.append(f"{where}: parameter {name!r} is not used by {method.name}"
                                  f"{did_you_mean(name, known)} (its parameters: {', '.join(known)})")
                elif per_model and known[name].scope is Scope.SHARED:
                    errors.append(f"{where}: {name!r} applies to the whole merge; move it to the top-level parameters")
                else:
                    _check_setting(setting, f"{where}.{name}", errors)

        check_params(self.parameters, "parameters", per_model=False)
        for i, m in enumerate(self.models):
            check_params(m.parameters, f"models[{i}] ({m.model})", per_model=True)
        for i, s in enumerate(self.slices):
            check_params(s.parameters, f"slices[{i}]", per_model=False)
            for j, src in enumerate(s.sources):
                check_params(src.parameters, f"slices[{i}].sources[{j}] ({src.model})", per_model=True)

        refs = self.referenced_models()
        tok = self.vocabulary_source()
        where = "tokenizer.source" if self.tokenizer is not None else "tokenizer_source"
        if tok not in (None, "base", "union") and tok not in refs:
            errors.append(f"{where} {tok!r} is not a model of this recipe: use base, union, or one of "
                          + ", ".join(repr(r) for r in refs))
        for token, cfg in ((self.tokenizer or {}).get("tokens") or {}).items():
            src = cfg.get("source")
            model = src.get("model") if isinstance(src, Mapping) else src
            if model is not None and model not in refs:
                errors.append(f"tokenizer.tokens[{token!r}].source: model {model!r} is not a model of this "
                              "recipe: name one of " + ", ".join(repr(r) for r in refs))

        groups = [(list(m.model for m in self.models), self.base_model, "models")] if self.models else [
            ([src.model for src in s.sources], s.base_model or self.base_model, f"slices[{i}]")
            for i, s in enumerate(self.slices)
        ]
        for refs, base, where in groups:
            if method.base is BasePolicy.REQUIRED and not base:
                errors.append(f"{method.name} needs base_model: name the model the others were fine-tuned from")
                continue
            if self.slices and method.base is BasePolicy.REQUIRED and base not in refs:
                errors.append(f"{where}: base_model {base!r} must be one of the slice's sources")
            uses_base = method.base is not BasePolicy.IGNORED and base is not None
            count = len([r for r in refs if not (uses_base and r == base)])
            if method.base is BasePolicy.IGNORED and base and self.models and base not in refs:
                count += 1  # mergekit adds an unlisted base to the inputs
            if count < method.min_models or (method.max_models is not None and count > method.max_models):
                want = (f"exactly {method.min_models}" if method.min_models == method.max_models
                        else f"at least {method.min_models}" if method.max_models is None
                        else f"{method.min_models} to {method.max_models}")
                errors.append(f"{where}: {method.name} merges {want} model(s) besides the base, got {count}")
        return errors


class _FlowListDumper(yaml.SafeDumper):
    pass


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)


def _ref(value: Any) -> str | None:
    return None if value is None else str(value)


def _model_entry(item: Any, i: int, errors: list[str]) -> ModelEntry:
    if isinstance(item, str):
        return ModelEntry(model=item)
    if not isinstance(item, Mapping) or "model" not in item:
        errors.append(f"models[{i}] must be a mapping with a 'model' key, got {item!r}")
        return ModelEntry(model="?")
    params = item.get("parameters") or {}
    if not isinstance(params, Mapping):
        errors.append(f"models[{i}].parameters must be a mapping")
        params = {}
    return ModelEntry(model=str(item["model"]), parameters=FrozenMap(params))


def _output_slice(item: Any, i: int, errors: list[str]) -> OutputSlice:
    if not isinstance(item, Mapping) or not item.get("sources"):
        errors.append(f"slices[{i}] must be a mapping with a non-empty 'sources' list")
        return OutputSlice(sources=())
    sources = []
    for j, src in enumerate(item["sources"]):
        where = f"slices[{i}].sources[{j}]"
        if not isinstance(src, Mapping) or "model" not in src or "layer_range" not in src:
            errors.append(f"{where} needs 'model' and 'layer_range: [start, end]'")
            continue
        lr = src["layer_range"]
        if (not isinstance(lr, (list, tuple)) or len(lr) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr) or not 0 <= lr[0] < lr[1]):
            errors.append(f"{where}.layer_range {lr!r} must be [start, end] with 0 <= start < end")
            continue
        sources.append(SliceSource(model=str(src["model"]), layer_range=(lr[0], lr[1]),
                                   parameters=FrozenMap(src.get("parameters") or {})))
    lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
    if len(lengths) > 1:
        errors.append(f"slices[{i}]: every source must span the same number of layers, got {sorted(lengths)}")
    return OutputSlice(sources=tuple(sources), base_model=_ref(item.get("base_model")),
                       parameters=FrozenMap(item.get("parameters") or {}))


def _tokenizer_block(item: Any, errors: list[str]) -> FrozenMap | None:
    """mergekit's ``tokenizer:`` block: source (default union), tokens, pad_to_multiple_of."""
    if item is None:
        return None
    if not isinstance(item, Mapping):
        errors.append("tokenizer must be a mapping with source, tokens and/or pad_to_multiple_of")
        return None
    settings = ("source", "tokens", "pad_to_multiple_of")
    for key in set(item) - set(settings):
        errors.append(f"tokenizer.{key} is not a tokenizer setting{did_you_mean(key, settings)}")
    if not isinstance(item.get("source", "union"), str):
        errors.append(f"tokenizer.source must be base, union or a model reference, got {item['source']!r}")
    pad = item.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        errors.append(f"tokenizer.pad_to_multiple_of must be a positive whole number, got {pad!r}")
    tokens = item.get("tokens") or {}
    if not isinstance(tokens, Mapping):
        errors.append("tokenizer.tokens must map each token to {source: ..., force: ...}")
        tokens = {}
    for token, cfg in tokens.items():
        where = f"tokenizer.tokens[{token!r}]"
        if not isinstance(cfg, Mapping) or set(cfg) - {"source", "force"}:
            errors.append(f"{where} must be a mapping with source and/or force")
            continue
        if not isinstance(cfg.get("force", False), bool):
            errors.append(f"{where}.force must be true or false")
        src = cfg.get("source")
        if src is None or isinstance(src, str):
            continue
        if not isinstance(src, Mapping) or src.get("kind") not in ("zero", "model_token"):
            errors.append(f"{where}.source must be a model, {{kind: zero}} or "
                          "{kind: model_token, model: ..., token: ... | token_id: ...}")
        elif src["kind"] == "model_token" and (not src.get("model")
                                               or ("token" in src) == ("token_id" in src)):
            errors.append(f"{where}.source: a model_token source needs model and exactly one of token, token_id")
    return FrozenMap(item)


def _check_setting(setting: Any, where: str, errors: list[str]) -> None:
    """A setting is a scalar, a list of scalars (a gradient), or filtered values."""
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return
    if isinstance(setting, Mapping):
        setting = (setting,)
    if isinstance(setting, tuple):
        if not setting:
            errors.append(f"{where}: an empty list has no value")
        elif all(isinstance(e, (bool, int, float, str)) for e in setting):
            return
        elif all(isinstance(e, Mapping) and "value" in e for e in setting):
            for k, e in enumerate(setting):
                if set(e) - {"filter", "value"}:
                    errors.append(f"{where}[{k}]: a filtered value has only 'filter' and 'value' keys")
                _check_setting(e["value"], f"{where}[{k}].value", errors)
        else:
            errors.append(f"{where}: expected a number, a list of numbers, or [{{filter: ..., value: ...}}]")
        return
    errors.append(f"{where}: unsupported value {setting!r}")


def evaluate_setting(setting: Any, *, tensor_name: str, t: float) -> Any:
    """Resolve one setting for a tensor at relative depth ``t`` in [0, 1].

    Lists interpolate like mergekit gradients: a list with one value per layer gives
    each layer exactly its value. Filters match a substring of the tensor name; the
    first match wins; ``None``/``"*"`` match everything. Returns None when nothing matches.
    """
    if isinstance(setting, Mapping):
        setting = (setting,)
    if not isinstance(setting, tuple):
        return setting
    if not setting:
        return None
    if all(isinstance(e, Mapping) for e in setting):
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and str(flt) in tensor_name):
                return evaluate_setting(cond["value"], tensor_name=tensor_name, t=t)
        return None
    numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
    if not numeric:
        return setting[int(t * (len(setting) - 1))]
    scaled = t * (len(setting) - 1)
    i0 = int(scaled)
    i1 = min(len(setting) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * setting[i0] + frac * setting[i1]
