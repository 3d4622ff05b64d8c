"""The genome: per-layer (or per-block, or global) parameters of each source model,
named for Optuna, and its mapping to a mergekit-compatible recipe.

Parameter names read as ``m<model>.<param>[.attn|.mlp].<group>``, e.g. ``m0.weight.L03``
(layer 3), ``m1.density.mlp.B1`` (second block of layers, MLP tensors), ``m0.weight.all``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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

    def name(self, model: int, param: str, part: str | None, group: str) -> str:
        return ".".join(x for x in (f"m{model}", param, part, group) if x is not None)

    def param_names(self) -> list[str]:
        return [self.name(m, p, part, g)
                for m in range(len(self.campaign.models))
                for p in self.campaign.params
                for part in self.parts
                for g in self.groups]

    def bounds(self, name: str) -> tuple[float, float]:
        return self.campaign.params[name.split(".")[1]]

    def distributions(self) -> dict[str, Any]:
        import optuna

        return {n: optuna.distributions.FloatDistribution(*self.bounds(n)) for n in self.param_names()}

    def per_layer(self, params: Mapping[str, float], model: int, param: str, part: str | None) -> list[float]:
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

    def to_recipe(self, params: Mapping[str, float]) -> Recipe:
        c = self.campaign
        models = []
        for m, ref in enumerate(c.models):
            settings: dict[str, Any] = {}
            for p in c.params:
                if c.split_attn_mlp:
                    attn = self.per_layer(params, m, p, "attn")
                    mlp = self.per_layer(params, m, p, "mlp")
                    # other tensors (norms, embeddings) take the mean of the two
                    rest = [(a + b) / 2 for a, b in zip(attn, mlp)]
                    settings[p] = [{"filter": ATTN_FILTER, "value": self._setting(attn)},
                                   {"filter": MLP_FILTER, "value": self._setting(mlp)},
                                   {"value": self._setting(rest)}]
                else:
                    settings[p] = self._setting(self.per_layer(params, m, p, None))
            models.append({"model": ref, "parameters": settings})
        return Recipe.from_dict({"merge_method": c.method, "base_model": c.base_model, "models": models,
                                 "seed": c.seed})

    def constant(self, per_model: Mapping[str, list[float]]) -> dict[str, float]:
        """A genome with one value per (model, param) everywhere, clamped into the ranges.

        ``per_model[param][m]`` is model m's value; params not given take the range's upper end
        for density-like params (no pruning) and the middle otherwise.
        """
        out = {}
        for name in self.param_names():
            m = int(name.split(".")[0][1:])
            p = name.split(".")[1]
            lo, hi = self.bounds(name)
            if p in per_model:
                value = per_model[p][m]
            else:
                value = hi if p in ("density",) else (lo + hi) / 2
            out[name] = min(hi, max(lo, float(value)))
        return out

    def baselines(self) -> list[tuple[str, dict[str, float]]]:
        """The uniform merge (equal weights of 1, the method's default density of 1) first,
        then each model alone (its weight 1, the others 0)."""
        n = len(self.campaign.models)
        default_density = [1.0] * n
        out = [("uniform", self.constant({"weight": [1.0] * n, "density": default_density}))]
        for i, ref in enumerate(self.campaign.models):
            weights = [1.0 if j == i else 0.0 for j in range(n)]
            out.append((f"model:{ref}", self.constant({"weight": weights, "density": default_density})))
        return out
