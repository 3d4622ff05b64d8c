"""Base and source weights kept on the device for the whole search.

``ResidentModels`` reads the base and each source once and keeps their tensors on the
device; ``materialize`` then writes the merge of any recipe over those models into a
live ``nn.Module`` in place: no disk I/O per candidate, and the module (with its
evaluator) is built once. It runs the very code the disk merge runs
(``materialize.iter_merged``) on the same inputs, so a candidate scored here is
bit-identical to its export on the same device.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from merge_core.devices import resolve_device
from merge_core.errors import MergeError
from merge_core.io import TensorReader
from merge_core.plan import MergePlan
from merge_core.recipe import Recipe
from merge_core.sources import ModelSource, resolve_model


class ResidentModels:
    """The tensors of a base model and its fine-tunes, resident on one device."""

    def __init__(self, base_model: str, models: Sequence[str], *, device: str | torch.device = "auto",
                 allow_pickle: bool = False, sources: dict[str, ModelSource] | None = None):
        from merge_core.materialize import prepare

        self.device = resolve_device(device)
        self.base_model = base_model
        self.models = list(models)
        refs = [base_model, *self.models]
        self.sources = sources or {r: resolve_model(r, allow_pickle=allow_pickle) for r in refs}
        self._prepare = prepare
        # a probe recipe over every model runs the compatibility checks once, up front
        self.plan(Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": base_model,
                                    "models": [{"model": m, "parameters": {"weight": 1.0}} for m in self.models]}))
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        for ref in refs:
            with TensorReader(self.sources[ref].weight_files, pickle_ok=allow_pickle) as r:
                self.tensors[ref] = {name: r.get(name, device=self.device) for name in r.names()}

    def plan(self, recipe: Recipe) -> MergePlan:
        """The plan of ``recipe`` over the resident models (cached by recipe content)."""
        cache: dict[str, MergePlan] = self.__dict__.setdefault("_plans", {})
        key = recipe.digest()
        if key not in cache:
            known = {self.base_model, *self.models}
            unknown = [r for r in recipe.referenced_models() if r not in known]
            if unknown or recipe.slices:
                raise MergeError(f"the resident models are {sorted(known)}; this recipe also reads "
                                 f"{unknown or 'layer slices'}: build ResidentModels with those models")
            cache[key] = self._prepare(recipe, self.sources)
        return cache[key]

    def merged_tensors(self, recipe: Recipe) -> Iterator[tuple[str, torch.Tensor]]:
        from merge_core.materialize import iter_merged

        def fetch(ref: str, name: str) -> torch.Tensor:
            return self.tensors[ref][name]  # methods never modify their inputs

        for tp, tensor in iter_merged(self.plan(recipe), fetch, prefetch=False):
            yield tp.name, tensor

    @torch.no_grad()
    def materialize(self, recipe: Recipe, module: nn.Module) -> int:
        """Write the merge of ``recipe`` into ``module``'s parameters in place.

        Returns the number of non-finite values in the merge (0 for a healthy candidate).
        """
        targets = dict(module.named_parameters())
        targets.update(dict(module.named_buffers()))
        bad = 0
        for name, tensor in self.merged_tensors(recipe):
            target = targets.get(name)
            if target is None:
                raise MergeError(f"the live model has no parameter {name!r}: build it from the base model's config")
            if tuple(target.shape) != tuple(tensor.shape):
                raise MergeError(f"parameter {name!r} is {tuple(target.shape)} in the live model but "
                                 f"{tuple(tensor.shape)} in the merge")
            # one reduction first; the exact count only when it is not finite (an overflowing
            # sum of finite values is a false alarm the count then clears)
            if tensor.is_floating_point() and not torch.isfinite(tensor.sum()):
                bad += int(tensor.numel() - torch.isfinite(tensor).sum())
            target.copy_(tensor)
        return bad

    def load_module(self, *, dtype: torch.dtype | None = None) -> nn.Module:
        """A live model of the base's architecture on the device, ready for ``materialize``."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(self.sources[self.base_model].path))
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        model.eval()
        return model
