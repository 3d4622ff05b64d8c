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

Where the models live (``keep``): ``"device"`` holds them on the device for the whole search;
``"host"`` holds them in host memory (pinned when the device is a GPU) and streams each
tensor's inputs to the device as it is merged, the next tensor's copies (non-blocking, on
their own CUDA stream) overlapping the current tensor's merge. The merge runs the same
kernels on the same values either way, so its result is bit-identical; host mode keeps
no magnitude cache (it would put a copy of every source back on the device).
"""

from __future__ import annotations

import logging
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
CACHE_SHARE = 0.4        # default budget: this share of the memory free when the cache is built
KEEP = ("device", "host")  # where ResidentModels holds the base and fine-tunes
log = logging.getLogger("brmerge.resident")


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
                 magnitude_cache_bytes: int | str | None = None, keep: str = "device"):
        from merge_core.materialize import prepare

        if keep not in KEEP:
            raise MergeError(f"keep={keep!r}: the models are kept on the 'device' or the 'host'")
        self.device = resolve_device(device)
        self.keep = keep
        cuda = self.device.type == "cuda"
        where = self.device if keep == "device" else torch.device("cpu")
        self.base_model = base_model
        self.models = list(models)
        refs = [base_model, *self.models]
        self.sources = sources or {r: resolve_model(r, allow_pickle=allow_pickle) for r in refs}
        self._prepare = prepare
        check_compatible([self.sources[r] for r in refs])   # up front, before any tensor is read
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        for ref in refs:
            with open_reader(self.sources[ref], pickle_ok=allow_pickle) as r:
                self.tensors[ref] = {name: _host(r.get(name, device=where), pin=cuda and keep == "host")
                                     for name in r.names()}
        self._cache_setting = magnitude_cache_bytes
        cache_budget(magnitude_cache_bytes, self.device)      # a bad setting fails here, not mid-search
        self.magnitudes: runtime.MagnitudeCache | None = None  # built at the first merge (see _cache)
        self._cache_deferred = False
        self._copy_stream = torch.cuda.Stream(self.device) if cuda and keep == "host" else None

    def defer_magnitude_cache(self) -> None:
        """Merge without the magnitude cache until :meth:`size_magnitude_cache` is called: a
        worker calls that after its first evaluation, so the budget is taken from the memory
        the evaluator's peak left free (CUDA counts the blocks its allocator keeps)."""
        self._cache_deferred = self.magnitudes is None

    def size_magnitude_cache(self) -> runtime.MagnitudeCache | None:
        """Build the magnitude cache now (budget from the memory free now), logging the choice."""
        self._cache_deferred = False
        cache = self._cache()
        if cache is None:
            log.info("magnitude cache: off (sources kept on the host)")
        elif cache.budget_bytes == 0:
            log.info("magnitude cache: off (its setting is 0)")
        else:
            log.info("magnitude cache: budget %.2f GiB on %s (sized after the evaluator's peak)",
                     cache.budget_bytes / 2**30, self.device)
        return cache

    def _cache(self) -> runtime.MagnitudeCache | None:
        """The magnitude cache, its budget taken from the memory free when it is first needed
        (the live model and the evaluator exist by then); None while deferred or with
        host-kept sources."""
        if self.keep == "host" or self._cache_deferred:
            return None
        if self.magnitudes is None:
            self.magnitudes = runtime.MagnitudeCache(cache_budget(self._cache_setting, self.device))
            for tensors in self.tensors.values():
                self.magnitudes.register(*tensors.values())
        return self.magnitudes

    def _fetch_streamed(self, ref: str, name: str) -> torch.Tensor:
        """One host tensor on the device. On a GPU the copy runs on its own stream, and this
        (prefetch) thread waits for it, so the next tensor's transfer overlaps this merge."""
        host = self.tensors[ref][name]
        if self._copy_stream is None:
            return host                               # host is the device (CPU)
        with torch.cuda.stream(self._copy_stream):
            out = host.to(self.device, non_blocking=True)
        self._copy_stream.synchronize()
        out.record_stream(torch.cuda.default_stream(self.device))  # merged on the default stream
        return out

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

        streamed = self.keep == "host" and self._copy_stream is not None

        def out_for(tp) -> torch.Tensor | None:
            target = targets.get(tp.name) if targets else None
            return target if target is not None and tuple(target.shape) == tuple(tp.shape) else None

        with runtime.settings(cache=self._cache(), threads=torch.get_num_threads(), tally=tally):
            for tp, tensor in iter_merged(self.plan(recipe), self._fetch_streamed if streamed else fetch,
                                          prefetch=streamed, out_for=out_for):
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

    @property
    def checkpoint_dtype(self) -> torch.dtype | None:
        """The base's floating-point dtype (the one most of its elements have), or None."""
        counts: dict[torch.dtype, int] = {}
        for t in self.tensors[self.base_model].values():
            if t.is_floating_point():
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        return max(counts, key=counts.__getitem__) if counts else None

    def compute_dtype(self, requested: str = "auto") -> torch.dtype:
        """The live model's dtype for ``eval.dtype`` = ``requested`` (see merge_core.dtypes)."""
        from merge_core.dtypes import compute_dtype

        return compute_dtype(requested, checkpoint_dtype=self.checkpoint_dtype, device=self.device)

    def load_module(self, *, dtype: torch.dtype | None = None) -> nn.Module:
        """A live model of the base's architecture on the device, ready for ``materialize``,
        in ``dtype`` (float32 when None): the merge is cast into it once per tensor."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(self.sources[self.base_model].path))
        with torch.device(self.device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
        model.eval()
        return model


def _host(t: torch.Tensor, *, pin: bool) -> torch.Tensor:
    """``t`` as kept: in page-locked memory when it will be streamed to a GPU (a non-blocking
    copy needs it), else as read."""
    return t.pin_memory() if pin else t


def as_live_module(loaded: nn.Module, device: str | torch.device, *,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """``loaded``'s weights in a module built as ``ResidentModels.load_module`` builds the live
    model (``dtype``, float32 when None, ``from_config``, fresh allocations on the device): the
    weights are cast into it as ``materialize`` casts the merge. ``brmerge export`` scores
    the exported weights in it, so its proof scores them exactly as the trial did.

    A model straight from ``from_pretrained`` can hold memory-mapped weights at other alignments,
    and the CPU matmul kernels then round differently in the last bits (measured: gold-letter
    probabilities 1e-7 apart on identical weights), which would fail the exact comparison.
    """
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=dtype or torch.float32)
    model.load_state_dict(loaded.state_dict())  # copy_ into the module's dtype, as materialize
    del loaded
    return model.eval()
