"""Executing a plan: one output tensor at a time, streamed to disk or into a live model."""

from __future__ import annotations

import contextvars
import json
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_core import methods
from merge_core.checks import check_compatible, read_tensor_infos
from merge_core.configs import stacked_config
from merge_core.devices import cpu_cores, resolve_device
from merge_core.dtypes import torch_dtype
from merge_core.errors import MergeError
from merge_core.io import (
    OutputTensor,
    ShardedWriter,
    check_output,
    parse_size,
)
from merge_core.lora import open_reader
from merge_core.methods import runtime
from merge_core.methods.base import MergeParams
from merge_core.plan import MergePlan, TensorPlan, build_plan
from merge_core.provenance import build_provenance, write_model_card
from merge_core.recipe import Recipe
from merge_core.sources import ModelSource, remote_code_files, resolve_model
from merge_core.tokenizers import tokenizer_files
from merge_core.vocab import AlignedFetch, plan_vocabulary

WORKERS_ENV = "BRMERGE_MERGE_WORKERS"
FEW_CORES = 4            # up to this many cores, a CPU disk merge runs one tensor per core
DEFAULT_SHARD_SIZE = "5GB"   # Hugging Face's own default for save_pretrained shards

Fetch = Callable[[str, str], torch.Tensor]


def merge_tensor(method: methods.MergeMethod, tp: TensorPlan, inputs: list[torch.Tensor],
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Run the method on the already-fetched inputs of one planned tensor.

    ``out`` (optional): a tensor the result may be written into, used when the method
    writes into a caller's tensor and ``out`` has the base's dtype, size and device.
    """
    base = inputs[tp.base_index] if tp.base_index is not None else None
    others = [x for i, x in enumerate(inputs) if i != tp.base_index]
    params = MergeParams(shared=tp.shared, models=tp.models)
    if (out is not None and base is not None and method.writes_out
            and out.dtype == base.dtype and out.numel() == base.numel() and out.device == base.device
            and out.is_contiguous()):
        merged = method.merge(base, others, params, seed=tp.seed, out=out)
    else:
        merged = method.merge(base, others, params, seed=tp.seed)
    return merged.to(torch_dtype(tp.out_dtype))


def iter_merged(plan: MergePlan, fetch: Fetch, *, prefetch: bool = True,
                out_for: Callable[[TensorPlan], torch.Tensor | None] | None = None,
                workers: int = 1) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
    """Yield (planned tensor, merged tensor) in plan order.

    With ``prefetch``, the inputs of the next tensor are read on a background thread
    while this one is merged (reading is memcpy from the page cache and releases the GIL).
    ``out_for(tp)`` may offer a tensor to merge into (see ``merge_tensor``); the yielded
    tensor is then that one when the method used it.

    ``workers`` > 1: that many tensors are read and merged at once, each on its own thread
    with the CPU kernels on that one thread (``runtime.kernel_threads`` = 1), in the
    caller's context otherwise. Results still come in plan order; at most
    ``workers`` + 1 tensors are under way or waiting to be taken. The output does not
    depend on ``workers``: each tensor is merged by the same code from the same inputs
    (randomized methods seed per tensor).
    """
    method = methods.get(plan.method)
    cast = torch_dtype(plan.compute_dtype) if plan.compute_dtype else None

    def load(tp: TensorPlan) -> list[torch.Tensor]:
        if isinstance(fetch, AlignedFetch):  # vocabulary rows filled per output tensor
            xs = fetch.inputs(tp.name, tp.inputs)
        else:
            xs = [fetch(ref, name) for ref, name in tp.inputs]
        return [x.to(cast) if cast is not None and x.is_floating_point() else x for x in xs]

    def merged(tp: TensorPlan, inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        return merge_tensor(method, tp, load(tp) if inputs is None else inputs,
                            out_for(tp) if out_for is not None else None)

    if workers > 1:
        yield from _merged_on_threads(plan, merged, workers)
        return
    if not prefetch:
        for tp in plan.tensors:
            yield tp, merged(tp)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="brmerge-read") as pool:
        pending: Future | None = pool.submit(load, plan.tensors[0]) if plan.tensors else None
        for i, tp in enumerate(plan.tensors):
            inputs = pending.result()
            pending = pool.submit(load, plan.tensors[i + 1]) if i + 1 < len(plan.tensors) else None
            yield tp, merged(tp, inputs)


def _merged_on_threads(plan: MergePlan, merged: Callable[[TensorPlan], torch.Tensor],
                       workers: int) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
    caller = contextvars.copy_context()

    def job(tp: TensorPlan) -> torch.Tensor:
        def one_thread() -> torch.Tensor:
            runtime.kernel_threads.set(1)         # in this job's copy of the caller's context
            return merged(tp)
        return caller.copy().run(one_thread)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="brmerge-merge")
    queued: deque[tuple[TensorPlan, Future]] = deque()
    upcoming = iter(plan.tensors)
    try:
        for tp in upcoming:
            queued.append((tp, pool.submit(job, tp)))
            if len(queued) > workers:
                break
        while queued:
            tp, future = queued.popleft()
            tensor = future.result()
            nxt = next(upcoming, None)
            if nxt is not None:
                queued.append((nxt, pool.submit(job, nxt)))
            yield tp, tensor
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an error or an early stop: no job left running


def disk_workers(dev: torch.device) -> int:
    """How many tensors a disk merge works on at once (``BRMERGE_MERGE_WORKERS`` overrides).

    One on CUDA, where the device does the work. On a CPU with a few cores, one per core,
    each tensor's kernels on one thread: a single tensor's kernels get all cores but one
    (the reader, writer and hashing threads need it), which on 2 cores leaves half the
    machine to threads that are mostly idle. With more cores the kernels' threads use the
    machine and only one tensor's inputs are held at a time.
    """
    text = os.environ.get(WORKERS_ENV, "").strip()
    if text:
        try:
            n = int(text)
        except ValueError:
            raise MergeError(f"{WORKERS_ENV}={text!r} is not a whole number: set it to the number of "
                             "tensors to merge at once, e.g. 2, or unset it") from None
        if n < 1:
            raise MergeError(f"{WORKERS_ENV}={text!r} must be at least 1: set it to e.g. 2, or unset it")
        return n
    if dev.type != "cpu":
        return 1
    cores = cpu_cores()
    return cores if cores <= FEW_CORES else 1


@dataclass(frozen=True)
class MergeSummary:
    out_dir: Path
    tensors: int
    bytes: int
    seconds: float
    device: str

    def line(self) -> str:
        return (f"merged {self.tensors} tensors, {self.bytes / 1e9:.2f} GB in {self.seconds:.1f} s "
                f"on {self.device} -> {self.out_dir}")


def resolve_sources(recipe: Recipe, *, allow_pickle: bool = False,
                    trust_remote_code: bool = False) -> dict[str, ModelSource]:
    return {ref: resolve_model(ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
            for ref in recipe.referenced_models()}


def prepare(recipe: Recipe, sources: Mapping[str, ModelSource]) -> MergePlan:
    """Compatibility checks, then the plan: everything that can fail before any tensor is read."""
    infos = {ref: read_tensor_infos(src) for ref, src in sources.items()}
    ordered = [sources[ref] for ref in recipe.referenced_models()]
    vocab = plan_vocabulary(recipe, sources)   # tokenizers only: rows aligned by token string
    check_compatible(ordered, infos=infos, same_layers=not recipe.slices,
                     tokenizer_source=recipe.tokenizer_source, align_vocab=vocab is not None)
    return build_plan(recipe, infos=infos, configs={ref: src.config for ref, src in sources.items()},
                      vocab=vocab)


def output_config(plan: MergePlan, sources: Mapping[str, ModelSource]) -> dict[str, Any]:
    config = stacked_config(sources[plan.config_source].config, num_layers=plan.num_layers,
                            layer_sources=[(sources[ref].config, i) for ref, i in plan.layer_sources],
                            vocab_size=plan.vocab.size if plan.vocab is not None else None)
    dtypes = {t.out_dtype for t in plan.tensors}
    if len(dtypes) == 1:
        config["dtype"] = dtypes.pop()
        config.pop("torch_dtype", None)
    return config


def merge_to_disk(recipe: Recipe, out_dir: str | Path, *, device: str = "auto",
                  shard_size: str | int = DEFAULT_SHARD_SIZE, allow_pickle: bool = False,
                  trust_remote_code: bool = False, overwrite: bool = False, progress: bool = True,
                  recipe_text: str | None = None, extra_provenance: Mapping[str, Any] | None = None,
                  card_sections: tuple[tuple[str, str], ...] = (),
                  protected: tuple[str | Path, ...] = ()) -> MergeSummary:
    """Merge ``recipe`` into a model folder that ``from_pretrained`` loads.

    ``overwrite`` replaces an earlier brmerge output at ``out_dir``, never a source model or
    a ``protected`` folder (see ``io.check_output``)."""
    start = time.perf_counter()
    dev = resolve_device(device)
    max_shard = parse_size(shard_size)
    sources = resolve_sources(recipe, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    plan = prepare(recipe, sources)
    method = methods.get(plan.method)
    protected = (*(src.path for src in sources.values()), *protected)
    check_output(out_dir, overwrite=overwrite, protected=protected)   # before any work

    # Hash the sources for the provenance while the merge runs (hashlib releases the GIL).
    refs = recipe.referenced_models()
    base_src = sources[recipe.base_model] if recipe.base_model else None
    model_srcs = [sources[r] for r in refs if r != recipe.base_model]
    recipe_yaml = recipe_text or recipe.to_yaml()
    prov_result: dict[str, Any] = {}

    def provenance_job() -> None:
        prov_result["value"] = build_provenance(
            recipe=recipe.to_dict(), recipe_yaml=recipe_yaml, method=method.name, method_title=method.title,
            method_reference=method.reference, base_model=base_src, models=model_srcs,
            extra=dict(extra_provenance or {}, device=str(dev), plan_tensors=len(plan.tensors)),
            hash_workers=1)

    hasher = threading.Thread(target=provenance_job, name="brmerge-hash", daemon=True)
    hasher.start()

    readers = {ref: open_reader(src, pickle_ok=allow_pickle) for ref, src in sources.items()}
    outputs = [OutputTensor(t.name, t.shape, torch_dtype(t.out_dtype)) for t in plan.tensors]
    try:
        with ShardedWriter(out_dir, outputs, max_shard_bytes=max_shard, overwrite=overwrite,
                           protected=protected) as writer:

            def fetch(ref: str, name: str) -> torch.Tensor:
                return readers[ref].get(name, device=dev)

            if plan.vocab is not None:  # embedding/head rows rebuilt for the output vocabulary
                fetch = AlignedFetch(plan.vocab, fetch, dtype=getattr(torch, plan.compute_dtype)
                                     if plan.compute_dtype else None)

            bar = _progress(len(plan.tensors), progress, desc=f"merging ({plan.method})")
            # Writing (a copy into the page cache, GIL released) overlaps the next merge;
            # one write in flight keeps one extra output tensor in memory at most.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="brmerge-write") as wpool:
                pending: Future | None = None
                for tp, tensor in iter_merged(plan, fetch, workers=disk_workers(dev)):  # in plan order
                    if pending is not None:
                        pending.result()
                    pending = wpool.submit(writer.write, tp.name, tensor)
                    bar.update(1)
                if pending is not None:
                    pending.result()
            bar.close()
            hasher.join()
            if "value" not in prov_result:
                raise RuntimeError("hashing the source files failed; see the log above")
            extra = _copy_side_files(plan, sources)
            extra["config.json"] = json.dumps(output_config(plan, sources), indent=2)
            extra["mergekit_config.yml"] = recipe_yaml
            write_model_card(writer.tmp_dir, prov_result["value"], extra_sections=card_sections)
            out = writer.commit(extra)
    finally:
        for r in readers.values():
            r.close()
    return MergeSummary(out_dir=out, tensors=len(plan.tensors), bytes=writer.bytes_written,
                        seconds=time.perf_counter() - start, device=str(dev))


def _copy_side_files(plan: MergePlan, sources: Mapping[str, ModelSource]) -> dict[str, Path | str]:
    files: dict[str, Path | str] = tokenizer_files(
        sources[plan.tokenizer_source].path, chat_template=plan.chat_template, sources=sources,
        rebuilt=dict(plan.vocab.tokenizer_files) if plan.vocab is not None else None)
    gen = sources[plan.config_source].path / "generation_config.json"
    if gen.is_file():
        files["generation_config.json"] = gen
    # a source accepted with --trust-remote-code: its auto_map's code files go with the config
    # and tokenizer copied from it (never imported here)
    for ref in {plan.config_source, plan.tokenizer_source}:
        files.update(remote_code_files(sources[ref].path))
    return files


def _progress(total: int, enabled: bool, *, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)
