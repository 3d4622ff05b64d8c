"""Base and source weights kept on the device for the whole search.

``ResidentModels`` reads the base and each source once and keeps their tensors on the
device; ``materialize`` then writes the merge of any recipe over those models into a
live ``nn.Module`` in place: no disk I/O per candidate, and the module (with its
evaluator) is built once. It runs the very code the disk merge runs
(``materialize.iter_merged``) on the same inputs, so a candidate scored here is
bit-identical to its export on the same device.

What only a repeated merge pays for (``methods.runtime``): the sorted magnitudes of each
source's task vector, so magnitude pruning finds its cut-off by a lookup (kept within a
memory budget: ``magnitude_cache_bytes``, or the ``BRMERGE_MAGNITUDE_CACHE`` environment
variable, e.g. ``20GB``; ``0`` turns it off); the kernels on every thread torch has; the
merge written straight into the live parameters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from merge_core.checks import check_compatible
from merge_core.devices import resolve_device
from merge_core.errors import MergeError
from merge_core.io import TensorReader, count_nonfinite, parse_size  # noqa: F401 (TensorReader: tests patch it)
from merge_core.lora import open_reader
from merge_core.methods import runtime
from merge_core.plan import MergePlan
from merge_core.recipe import Recipe
from merge_core.sources import ModelSource, resolve_model

CACHE_ENV = "BRMERGE_MAGNITUDE_CACHE"
CACHE_SHARE = 0.4        # default budget: this share of the memory free at the first merge


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now: CUDA's own count, or MemAvailable on the host."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cache_budget(setting: int | str | None, device: torch.device) -> int:
    """The magnitude cache's byte budget: ``setting``, else the environment variable,
    else ``CACHE_SHARE`` of the device's free memory."""
    if setting is None:
        setting = os.environ.get(CACHE_ENV) or None
    if setting is None:
        return int(free_memory(device) * CACHE_SHARE)
    if isinstance(setting, str) and setting.strip() == "0":
        return 0
    try:
        return parse_size(setting)
    except MergeError:
        raise MergeError(f"magnitude cache size {setting!r} ({CACHE_ENV}) is not a size: write e.g. "
                         "20GB, 500MB, or 0 to turn the cache off") from None


class ResidentModels:
    """The tensors of a base model and its fine-tunes, resident on one device."""

    def __init__(self, base_model: str, models: Sequence[str], *, device: str | torch.device = "auto",
                 allow_pickle: bool = False, sources: dict[str, ModelSource] | None = None,
                 magnitude_cache_bytes: int | str | None = None):
        from merge_core.materialize import prepare

        self.device = resolve_device(device)
        self.base_model = base_model
        self.models = list(models)
        refs = [base_model, *self.models]
        self.sources = sources or {r: resolve_model(r, allow_pickle=allow_pickle) for r in refs}
        self._prepare = prepare
        check_compatible([self.sources[r] for r in refs])   # up front, before any tensor is read
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        for ref in refs:
            with open_reader(self.sources[ref], pickle_ok=allow_pickle) as r:
                self.tensors[ref] = {name: r.get(name, device=self.device) for name in r.names()}
        self._cache_setting = magnitude_cache_bytes
        cache_budget(magnitude_cache_bytes, self.device)      # a bad setting fails here, not mid-search
        self.magnitudes: runtime.MagnitudeCache | None = None  # built at the first merge (see _cache)

    def _cache(self) -> runtime.MagnitudeCache:
        """The magnitude cache, its budget taken from the memory free at the first merge
        (the live model and the evaluator exist by then)."""
        if self.magnitudes is None:
            self.magnitudes = runtime.MagnitudeCache(cache_budget(self._cache_setting, self.device))
            for tensors in self.tensors.values():
                self.magnitudes.register(*tensors.values())
        return self.magnitudes

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
            if recipe.vocabulary_source() is not None:
                raise MergeError("resident merges keep the models' own vocabulary rows: drop "
                                 "tokenizer_source/tokenizer from the recipe, or merge it to disk")
            cache[key] = self._prepare(recipe, self.sources)
        return cache[key]

    def merged_tensors(self, recipe: Recipe, targets: dict[str, torch.Tensor] | None = None,
                       tally: runtime.NonFiniteTally | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor) in plan order; a tensor of ``targets`` (by name) may be
        merged into directly, and is then the one yielded. Kernels that count the inf/NaN
        values they write record them in ``tally``."""
        from merge_core.materialize import iter_merged

        def fetch(ref: str, name: str) -> torch.Tensor:
            return self.tensors[ref][name]  # methods never modify their inputs

        def out_for(tp) -> torch.Tensor | None:
            target = targets.get(tp.name) if targets else None
            return target if target is not None and tuple(target.shape) == tuple(tp.shape) else None

        with runtime.settings(cache=self._cache(), threads=torch.get_num_threads(), tally=tally):
            for tp, tensor in iter_merged(self.plan(recipe), fetch, prefetch=False, out_for=out_for):
                yield tp.name, tensor

    @torch.no_grad()
    def materialize(self, recipe: Recipe, module: nn.Module) -> int:
        """Write the merge of ``recipe`` into ``module``'s parameters in place.

        Returns the number of non-finite values in the merge (0 for a healthy candidate).
        """
        targets = dict(module.named_parameters())
        targets.update(dict(module.named_buffers()))
        live = {name: t.data for name, t in targets.items()}
        bad = 0
        tally = runtime.NonFiniteTally()
        for name, tensor in self.merged_tensors(recipe, live, tally):
            target = live.get(name)
            if target is None:
                raise MergeError(f"the live model has no parameter {name!r}: build it from the base model's config")
            if tuple(target.shape) != tuple(tensor.shape):
                raise MergeError(f"parameter {name!r} is {tuple(target.shape)} in the live model but "
                                 f"{tuple(tensor.shape)} in the merge")
            counted = tally.pop(target) if tensor.data_ptr() == target.data_ptr() else None
            if counted is None:
                target.copy_(tensor)
                counted = count_nonfinite(target)
            bad += counted
        return bad

    def load_module(self, *, dtype: torch.dtype | None = None) -> nn.Module:
        """A live model of the base's architecture on the device, ready for ``materialize``."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(self.sources[self.base_model].path))
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        model.eval()
        return model


def as_live_module(loaded: nn.Module, device: str | torch.device) -> nn.Module:
    """``loaded``'s weights in a module built as ``ResidentModels.load_module`` builds the live
    model (float32, ``from_config``, fresh allocations on the device): ``brmerge export`` scores
    the exported weights in it, so its proof scores them exactly as the trial did.

    A model straight from ``from_pretrained`` can hold memory-mapped weights at other alignments,
    and the CPU matmul kernels then round differently in the last bits (measured: gold-letter
    probabilities 1e-7 apart on identical weights), which would fail the exact comparison.
    """
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    return model.eval()
