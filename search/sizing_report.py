"""A campaign's worker plan (``brmerge plan``, the search's pre-flight) and its text.

``plan_campaign`` reads the inputs (``search.sizing_inputs``) and runs the arithmetic
(``search.sizing``); ``calibrate`` times one merge and one forward on this machine;
``preflight`` refuses a campaign whose worker cannot fit, in one line naming the fix.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Any

from merge_core.errors import BrmergeError
from search import sizing as Z
from search import sizing_inputs as I
from search.campaign import Campaign
from search.errors import DriverError


@dataclass
class CampaignPlan:
    worker: Z.WorkerPlan
    model: Z.ModelShape
    eval: Z.EvalShape
    n_models: int
    workers: int
    trials: int
    rates: Z.Rates
    load_seconds: float

    @property
    def trials_per_hour(self) -> float:
        return self.workers * 3600.0 / max(self.worker.trial_seconds, 1e-9)

    @property
    def wall_seconds(self) -> float:
        return self.load_seconds + self.trials * self.worker.trial_seconds / self.workers

    def as_dict(self) -> dict[str, Any]:
        w = self.worker
        return {"device": w.device, "capacity_bytes": w.capacity, "memory_bytes": dict(w.memory),
                "total_bytes": w.total, "fits": w.fits, "host_bytes": w.host,
                "setting": {"dtype": w.setting.dtype, "sources": w.setting.sources,
                            "magnitude_cache": w.setting.cache},
                "fix": w.fix, "fix_host_bytes": w.fix_host, "params": self.model.params,
                "checkpoint_dtype": self.model.checkpoint_dtype, "models": 1 + self.n_models,
                "batches": len(self.eval.batches), "largest_batch": list(self.eval.largest()),
                "items": self.eval.items, "seconds": dict(w.seconds),
                "trial_seconds": w.trial_seconds, "calibrated": self.rates.calibrated,
                "workers": self.workers, "trials": self.trials,
                "trials_per_hour": self.trials_per_hour, "wall_seconds": self.wall_seconds}


def _n_workers(campaign: Campaign) -> int:
    return campaign.workers if isinstance(campaign.workers, int) else 1


def plan_campaign(campaign: Campaign, *, gpu: str, memory_gib: float | None = None,
                  rates: Z.Rates | None = None, with_eval: bool = True,
                  sources: str | None = None) -> CampaignPlan:
    """The plan of one worker of ``campaign`` on ``gpu`` (``with_eval=False``: no items are
    tokenized and the evaluator's memory is left out, for a quick check of the weights)."""
    path = I.model_dir(campaign.base_model)
    model = I.model_shape(path)
    ev = I.eval_shape(campaign, path) if with_eval else Z.EvalShape(prefixes=(), batches=())
    s = I.setting(campaign, model, gpu=gpu)
    if sources is not None:
        s = replace(s, sources=sources)
    if s.max_batch_tokens:
        ev = Z.shrink_batches(ev, int(s.max_batch_tokens))   # as the evaluator bounds its batches
    rates = rates or Z.default_rates(gpu, cores=os.cpu_count() or 1)
    n = len(campaign.models)
    host = I.host_memory() if gpu == Z.CPU else None
    if s.sources == "auto":
        trial = Z.plan_worker(model, n, campaign.method, ev, replace(s, sources="device"), gpu=gpu,
                              rates=rates, memory_gib=memory_gib, host_bytes=host)
        s = replace(s, sources="device" if trial.fits or gpu == Z.CPU else "host")
    worker = Z.plan_worker(model, n, campaign.method, ev, s, gpu=gpu, rates=rates,
                           memory_gib=memory_gib, host_bytes=host)
    load = (1 + n) * model.params * Z.DTYPE_BYTES[model.checkpoint_dtype] / 1e9   # ~1 GB/s from disk
    return CampaignPlan(worker=worker, model=model, eval=ev, n_models=n, workers=_n_workers(campaign),
                        trials=campaign.trials, rates=rates, load_seconds=load)


def choose_sources(campaign: Campaign, *, gpu: str, memory_gib: float | None = None) -> str:
    """``workers.sources: auto``: ``device`` when the plan says the worker fits so, else ``host``."""
    plan = plan_campaign(campaign, gpu=gpu, memory_gib=memory_gib, sources="device")
    return "device" if plan.worker.fits or gpu == Z.CPU else "host"


def _gib(n: float) -> str:
    return f"{n / Z.GIB:.2f} GiB"


def lines(plan: CampaignPlan) -> list[str]:
    w, m = plan.worker, plan.model
    s = w.setting
    out = [f"model: {m.params / 1e9:.2f}B parameters, {m.checkpoint_dtype}, {m.layers} layers; "
           f"base + {plan.n_models} fine-tune(s)",
           f"evaluation: {plan.eval.items} items in {len(plan.eval.batches)} batches; largest batch "
           f"{plan.eval.largest()[0]} rows x ({plan.eval.largest()[1]} prefix + {plan.eval.largest()[2]}) tokens",
           f"setting: eval.dtype {s.dtype}, workers.sources {s.sources}, magnitude cache {s.cache}",
           f"memory per worker on {w.device}:"]
    out += [f"  {name:<16}{_gib(v):>12}" for name, v in w.memory.items()]
    out.append(f"  {'total':<16}{_gib(w.total):>12}   of {_gib(w.capacity)} usable")
    out.append(f"host RAM per worker: {_gib(w.host)}")
    if w.fits:
        out.append(f"verdict: fits ({_gib(w.capacity - w.total)} to spare)")
    else:
        out.append("verdict: does NOT fit")
        out.append(f"cheapest fix: {w.fix} (host RAM then {_gib(w.fix_host or 0)})" if w.fix
                   else "cheapest fix: none found: use a larger GPU (--gpu) or fewer fine-tunes")
    sec = w.seconds
    how = "calibrated on this machine" if plan.rates.calibrated else "from the device's data sheet"
    out.append(f"seconds per trial ({how}): merge {sec['merge']:.2f} + eval {sec['eval']:.2f} + "
               f"overhead {sec['overhead']:.2f} = {w.trial_seconds:.2f}")
    out.append(f"{plan.workers} worker(s): {plan.trials_per_hour:.0f} trials/hour; {plan.trials} trials in "
               f"~{plan.wall_seconds / 3600:.2f} h (load ~{plan.load_seconds:.0f} s)")
    return out


def preflight(campaign: Campaign) -> str | None:
    """Refuse (``DriverError``, one line with the fix) a campaign whose worker cannot fit on
    the workers' device (``sizing_inputs.local_device``); returns a line saying what was
    checked (a model the plan cannot size is left to the later checks). On CPU only the
    models are checked against host RAM (the items are not tokenized)."""
    gpu, gib = I.local_device()
    if campaign.gpus_per_worker == 0:
        gpu, gib = Z.CPU, None
    elif gpu == Z.CPU:   # GPU workers, planned from a machine without one: its RAM says nothing
        return f"plan: not checked (no GPU here; set {I.GPU_ENV} to the workers' GPU)"
    try:
        plan = plan_campaign(campaign, gpu=gpu, memory_gib=gib, with_eval=gpu != Z.CPU)
    except BrmergeError as exc:   # an unsized architecture or a missing folder: checked later
        return f"plan: not sized ({str(exc).splitlines()[0]})"
    w = plan.worker
    if not w.fits:
        fix = (f"set {w.fix} (host RAM then {_gib(w.fix_host or 0)})" if w.fix
               else "use a larger GPU or fewer fine-tunes")
        raise DriverError(f"a worker needs {_gib(w.total)} on {gpu} but {_gib(w.capacity)} is usable: "
                          f"{fix}; `brmerge plan CAMPAIGN` shows the breakdown")
    return f"plan: a worker needs {_gib(w.total)} of {_gib(w.capacity)} on {gpu}"


def calibrate(campaign: Campaign, plan: CampaignPlan) -> Z.Rates:
    """This machine's rates: a new recipe's plan and its materialize (after a first, warming
    one), and a forward of the largest batch over its prefix, timed; loads the weights."""
    import torch

    from evals import kv
    from merge_core.devices import resolve_device
    from merge_core.dtypes import torch_dtype
    from merge_core.plan import num_layers
    from merge_core.resident import ResidentModels
    from search.genome import GenomeSpace

    device = resolve_device("auto" if campaign.gpus_per_worker > 0 else "cpu")
    resident = ResidentModels(campaign.base_model, list(campaign.models), device=device,
                              keep=plan.worker.setting.sources)
    module = resident.load_module(dtype=torch_dtype(plan.worker.setting.dtype))
    base = resident.sources[campaign.base_model]
    space = GenomeSpace(campaign, num_layers(base.config, list(base.tensor_files())))
    # points inside the ranges: the first merge warms up (kernels, magnitude cache); then three
    # new recipes, as every trial's is, timed. Each timing is the fastest of three: on a machine
    # shared with other work, the run least slowed by it.
    first, *timed = (space.to_recipe({n: lo + f * (hi - lo) for n in space.param_names()
                                      for lo, hi in [space.bounds(n)]}) for f in (0.5, 0.3, 0.7, 0.9))
    resident.materialize(first, module)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    prepares, merges = [], []
    for recipe in timed:
        t0 = time.perf_counter()
        resident.plan(recipe)
        prepares.append(time.perf_counter() - t0)
        sync()
        t0 = time.perf_counter()
        resident.materialize(recipe, module)
        sync()
        merges.append(time.perf_counter() - t0)
    prepare_s, merge_s = min(prepares), min(merges)
    rows, prefix, row = plan.eval.largest()
    ids = torch.randint(0, plan.model.vocab, (rows, row), device=device)
    with torch.inference_mode():
        cache = kv.prefix_cache(module, ids[:1, :1].repeat(1, prefix), logits_to_keep=1) if prefix else None
        mask = torch.ones((rows, prefix + row), dtype=torch.long, device=device)
        module(input_ids=ids, attention_mask=mask, use_cache=cache is not None, logits_to_keep=1,
               **({"past_key_values": kv.widen(cache, rows)} if cache is not None else {}))   # warm-up
        times = []
        for _ in range(3):
            extra = {"past_key_values": kv.widen(cache, rows)} if cache is not None else {}
            sync()
            t0 = time.perf_counter()
            module(input_ids=ids, attention_mask=mask, use_cache=cache is not None, logits_to_keep=1, **extra)
            sync()
            times.append(time.perf_counter() - t0)
        forward_s = min(times)
    return rates_from_timings(plan, prepare_s=prepare_s, merge_s=merge_s, forward_s=forward_s,
                              batch=(rows, prefix, row), kind="gpu" if device.type == "cuda" else "cpu")


def rates_from_timings(plan: CampaignPlan, *, prepare_s: float, merge_s: float, forward_s: float,
                       batch: tuple[int, int, int], kind: str) -> Z.Rates:
    """Rates that reproduce the timings of one recipe's plan, one merge (plan cached) and one
    forward of ``batch``, through the same arithmetic as ``sizing.seconds``."""
    m, n, dtype = plan.model, plan.n_models, plan.worker.setting.dtype
    moved = m.params * ((1 + n) * Z.DTYPE_BYTES[m.checkpoint_dtype] + 8 * n + Z.DTYPE_BYTES[dtype])
    rate = Z.forward_flops(m, *batch) / max(forward_s, 1e-9)
    return Z.Rates(flops={dtype: rate, "float32": rate}, bandwidth=moved / max(merge_s, 1e-9), kind=kind,
                   calibrated=True, prepare_s=prepare_s / (m.n_tensors * (1 + n)))
