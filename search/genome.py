"""The genome: per-layer (or per-block, or global) parameters of each source model,
named for Optuna, and its mapping to a mergekit-compatible recipe.

Parameter names read as ``m<model>.<param>[.attn|.mlp].<group>``, e.g. ``m0.weight.L03``
(layer 3), ``m1.density.mlp.B1`` (second block of layers, MLP tensors), ``m0.weight.all``.
A whole-merge parameter (``sce``'s ``select_topk``, ``nearswap``'s ``t``, ``lambda``) is one per
group, not per model: ``shared.select_topk.L03``; the recipe gets it under its top-level
``parameters``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from merge_core.methods.base import Search
from merge_core.recipe import Recipe
from search.campaign import Campaign

# Filters that pick attention and MLP tensors out of a layer (Llama/Mistral/Qwen names).
ATTN_FILTER = "self_attn"
MLP_FILTER = "mlp"


@dataclass(frozen=True)
class GenomeSpace:
    campaign: Campaign
    num_layers: int

    @property
    def groups(self) -> list[str]:
        c = self.campaign
        if c.granularity == "global":
            return ["all"]
        if c.granularity == "layer":
            return [f"L{i:02d}" for i in range(self.num_layers)]
        size = c.block_size or 1
        return [f"B{i:02d}" for i in range((self.num_layers + size - 1) // size)]

    @property
    def parts(self) -> list[str | None]:
        return ["attn", "mlp"] if self.campaign.split_attn_mlp else [None]

    def name(self, model: int | None, param: str, part: str | None, group: str) -> str:
        owner = "shared" if model is None else f"m{model}"
        return ".".join(x for x in (owner, param, part, group) if x is not None)

    @property
    def per_model_params(self) -> list[str]:
        return [p for p in self.campaign.params if p not in self.campaign.shared_params]

    def param_names(self) -> list[str]:
        per_model = [self.name(m, p, part, g)
                     for m in range(len(self.campaign.models))
                     for p in self.per_model_params
                     for part in self.parts
                     for g in self.groups]
        return per_model + [self.name(None, p, part, g) for p in self.campaign.shared_params
                            for part in self.parts for g in self.groups]

    def bounds(self, name: str) -> tuple[float, float]:
        return self.campaign.params[name.split(".")[1]]

    def distributions(self) -> dict[str, Any]:
        import optuna

        return {n: optuna.distributions.FloatDistribution(*self.bounds(n)) for n in self.param_names()}

    def per_layer(self, params: Mapping[str, float], model: int | None, param: str,
                  part: str | None) -> list[float]:
        c = self.campaign
        if c.granularity == "global":
            return [float(params[self.name(model, param, part, "all")])] * self.num_layers
        if c.granularity == "layer":
            return [float(params[self.name(model, param, part, f"L{i:02d}")]) for i in range(self.num_layers)]
        size = c.block_size or 1
        return [float(params[self.name(model, param, part, f"B{i // size:02d}")]) for i in range(self.num_layers)]

    def _setting(self, values: list[float]) -> Any:
        # A list with one value per layer gives each layer exactly its value; a constant is a scalar.
        if len(set(values)) == 1:
            return values[0]
        return values

    def _value(self, params: Mapping[str, float], model: int | None, p: str) -> Any:
        if not self.campaign.split_attn_mlp:
            return self._setting(self.per_layer(params, model, p, None))
        attn = self.per_layer(params, model, p, "attn")
        mlp = self.per_layer(params, model, p, "mlp")
        rest = [(a + b) / 2 for a, b in zip(attn, mlp)]   # other tensors (norms, embeddings): the mean
        return [{"filter": ATTN_FILTER, "value": self._setting(attn)},
                {"filter": MLP_FILTER, "value": self._setting(mlp)},
                {"value": self._setting(rest)}]

    def to_recipe(self, params: Mapping[str, float]) -> Recipe:
        c = self.campaign
        models = []
        for m, ref in enumerate(c.models):
            entry: dict[str, Any] = {"model": ref}
            settings = {p: self._value(params, m, p) for p in self.per_model_params}
            if settings:
                entry["parameters"] = settings
            models.append(entry)
        recipe: dict[str, Any] = {"merge_method": c.method, "base_model": c.base_model, "models": models,
                                  "seed": c.seed}
        if c.shared_params:
            recipe["parameters"] = {p: self._value(params, None, p) for p in c.shared_params}
        return Recipe.from_dict(recipe)

    @cached_property
    def declared(self) -> dict[str, Search]:
        """Each searchable parameter's ``Search`` declaration, from the campaign's merge method."""
        from merge_core import methods

        return {p.name: p.search for p in methods.get(self.campaign.method).params if p.search is not None}

    def constant(self, per_model: Mapping[str, list[float]]) -> dict[str, float]:
        """A genome with one value per (model, param) everywhere, clamped into the ranges.

        ``per_model[param][m]`` is model m's value; params not given take the value the method
        declares neutral (``Search.neutral``), else the middle of the searched range.
        """
        declared = self.declared
        out = {}
        for name in self.param_names():
            owner, p = name.split(".")[:2]
            lo, hi = self.bounds(name)
            neutral = declared[p].neutral
            if p in per_model and owner != "shared":
                value = per_model[p][int(owner[1:])]
            else:
                value = neutral if neutral is not None else (lo + hi) / 2
            out[name] = min(hi, max(lo, float(value)))
        return out

    def baselines(self) -> list[tuple[str, dict[str, float]]]:
        """The uniform merge (every parameter at its neutral value: weights of 1, nothing
        pruned) first, then each model alone (its weight at the neutral value, the others 0),
        when the method has a parameter that singles a model out (``Search.selects_model``)."""
        out = [("uniform", self.constant({}))]
        n = len(self.campaign.models)
        selecting = {p: spec.neutral for p, spec in self.declared.items()
                     if spec.selects_model and p in self.campaign.params}
        if not selecting:   # nothing to single a model out with
            return out
        for i, ref in enumerate(self.campaign.models):
            alone = {p: [kept if j == i else 0.0 for j in range(n)] for p, kept in selecting.items()}
            out.append((f"model:{ref}", self.constant(alone)))
        return out
