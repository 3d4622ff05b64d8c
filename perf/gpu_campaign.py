"""A Mistral-7B-shaped campaign on one GPU: the plan against ``torch.cuda.max_memory_allocated``.

Builds a randomly initialised Mistral-7B-v0.1-shaped base and two fine-tunes (base + small
noise) in bfloat16 directly on the GPU and saves them as safetensors to local disk (no
downloads), then for each compute dtype (bfloat16, float32) builds the real worker
(``search.worker.TrialWorker``, as a search's actor does) and runs ``--trials`` trials
through ``TrialWorker.run`` on points of the campaign's search space. It prints, per dtype,
the plan (``search.sizing_report.plan_campaign`` for this GPU) beside the measured peak
``torch.cuda.max_memory_allocated`` after loading and over the trials, seconds per phase
(load, merge, eval) and trials per hour. A dtype whose worker the plan says cannot fit with
the sources on the device runs with the plan's fix (``workers.sources: host``) when this
checkout's campaign file knows that key, else is skipped with the reason.

Scored on the shipped sample suite (``--limit`` items per task), so the GPU machine needs no
data. It runs within 10 minutes on one H100 or H200 (building the checkpoints is about a
third of it). Imports: torch, transformers, safetensors, numpy, PyYAML, tqdm and ``optuna``
+ ``colorlog`` (``search.campaign`` imports optuna's samplers; no Ray, no lm-eval). Where the
GPU machine lacks optuna, fetch its pure-Python wheels here
(``pip download --no-deps optuna colorlog -d wheels``), carry ``wheels`` and run
``pip install --no-deps wheels/*`` there first. The tokenizer is Mistral's from
mistral-common when installed, else a byte-level BPE trained locally (``search.demo.tiny``).

    python perf/gpu_campaign.py                 # on the GPU machine
    python perf/gpu_campaign.py --small         # the same code on CPU with a tiny config
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MISSING_HINT = ("pip download --no-deps optuna colorlog -d wheels (here), carry wheels, "
                "pip install --no-deps wheels/* (there)")


def _check_imports() -> None:
    missing = []
    for name in ("torch", "transformers", "safetensors", "numpy", "yaml", "tqdm", "optuna", "colorlog"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SystemExit(f"gpu_campaign: missing {', '.join(missing)}: {MISSING_HINT}")


def _build(root: Path, *, small: bool, device: str) -> dict[str, Path]:
    import torch

    from perf import _random_models as R

    if importlib.util.find_spec("mistral_common") is None:   # no Mistral tokenizer here
        from search.demo.tiny import make_tokenizer

        R.tokenizer = lambda folder: make_tokenizer(folder, vocab_size=2000)
    return R.build(root, "mistral", "tiny" if small else "7B", dtype=torch.bfloat16, device=device)


def _campaign(folders: dict[str, Path], *, dtype: str, sources: str | None, limit: int, gpu: bool):
    """The campaign; ``(campaign, note)``: keys this checkout's campaign file lacks are left
    out and named in ``note``."""
    from search.campaign import CampaignError, parse_campaign

    data = {"name": "gpu-check", "base_model": str(folders["base"]),
            "models": [str(folders["ft1"]), str(folders["ft2"])], "method": "ties",
            "search": {"granularity": "layer", "params": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}},
            "eval": {"suite": "sample", "limit": limit, "stage1": False, "dtype": dtype},
            "workers": {"count": 1, "gpus_per_worker": 1 if gpu else 0,
                        **({"sources": sources} if sources else {})}}
    try:
        return parse_campaign(data), None
    except CampaignError as exc:
        if "unknown key" not in str(exc):
            raise
        data["eval"].pop("dtype")
        data["workers"].pop("sources", None)
        return parse_campaign(data), f"this checkout's campaign file lacks eval.dtype / workers.sources ({exc})"


def _peak_now(gpu: bool) -> int:
    import torch

    if gpu:
        return int(torch.cuda.max_memory_allocated())
    import psutil

    return psutil.Process().memory_info().rss


def run_dtype(folders: dict[str, Path], dtype: str, *, gpu: bool, trials: int, limit: int, gpu_kind: str,
              gpu_gib: float | None) -> dict:
    import random

    import torch

    from search.genome import GenomeSpace
    from search.sizing_report import plan_campaign
    from search.worker import TrialWorker

    campaign, note = _campaign(folders, dtype=dtype, sources=None, limit=limit, gpu=gpu)
    plan = plan_campaign(campaign, gpu=gpu_kind, memory_gib=gpu_gib)
    if not plan.worker.fits:
        campaign, note2 = _campaign(folders, dtype=dtype, sources="host", limit=limit, gpu=gpu)
        if note2:
            return {"dtype": dtype, "skipped": f"the plan says it does not fit ({plan.worker.fix}); {note2}"}
        plan = plan_campaign(campaign, gpu=gpu_kind, memory_gib=gpu_gib)
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    worker = TrialWorker(campaign, 0)
    load_s = time.perf_counter() - t0
    load_peak = _peak_now(gpu)
    space = GenomeSpace(campaign, worker.model.config.num_hidden_layers)
    rng = random.Random(0)
    merge, evaluation, walls = [], [], []
    for _ in range(trials):
        point = {n: rng.uniform(*space.bounds(n)) for n in space.param_names()}
        t = time.perf_counter()
        result = worker.run(space.to_recipe(point).to_yaml(), stage=2)
        walls.append(time.perf_counter() - t)
        if result.error:
            raise SystemExit(f"trial failed ({dtype}): {result.error}\n{result.traceback}")
        merge.append(result.materialize_seconds)
        evaluation.append(result.eval_seconds)
    cache = worker.resident.magnitudes.used_bytes if worker.resident.magnitudes is not None else 0
    mem = dict(plan.worker.memory)
    # what the peak can be compared with: max_memory_allocated sees neither the CUDA context nor
    # more cache than was built (the plan's ``auto`` cache is what is left, an upper bound)
    comparable = sum(mem.values()) - mem["magnitude cache"] + cache - (mem["runtime"] if gpu else 0)
    out = {"dtype": plan.worker.setting.dtype, "sources": plan.worker.setting.sources, "note": note,
           "planned_bytes": comparable, "planned": mem, "cache_built": cache,
           "measured_peak_load": load_peak, "measured_peak": _peak_now(gpu),
           "live_dtype": str(next(worker.model.parameters()).dtype).removeprefix("torch."),
           "load_s": load_s, "merge_s": sorted(merge)[len(merge) // 2],
           "eval_s": sorted(evaluation)[len(evaluation) // 2], "trial_s": sum(walls) / len(walls),
           "planned_s": dict(plan.worker.seconds), "trials": trials}
    del worker
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="a tiny config on CPU (tests the script)")
    p.add_argument("--trials", type=int, default=8, help="trials per dtype (default 8)")
    p.add_argument("--limit", type=int, default=12, help="sample-suite items per task (default 12)")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--root", type=Path, default=None, help="where the checkpoints go (default: a temp dir)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    _check_imports()
    import torch

    from search.sizing_inputs import local_device

    gpu = not args.small
    if gpu and not torch.cuda.is_available():
        raise SystemExit("gpu_campaign: no CUDA device here; run with --small to exercise the script on CPU")
    kind, gib = local_device() if gpu else ("cpu", None)
    with tempfile.TemporaryDirectory(prefix="gpu_campaign_", dir=args.root) as tmp:
        t0 = time.perf_counter()
        folders = _build(Path(tmp), small=args.small, device="cuda" if gpu else "cpu")
        build_s = time.perf_counter() - t0
        if gpu:
            torch.cuda.empty_cache()
        rows = [run_dtype(folders, d, gpu=gpu, trials=args.trials, limit=args.limit, gpu_kind=kind, gpu_gib=gib)
                for d in args.dtypes.split(",")]
    if args.json:
        print(json.dumps({"device": kind, "build_s": build_s, "runs": rows}, indent=2))
        return 0
    name = torch.cuda.get_device_name(0) if gpu else "CPU (--small: tiny config)"
    print(f"device: {name} (planned as {kind}); checkpoints built in {build_s:.0f} s")
    for r in rows:
        if "skipped" in r:
            print(f"{r['dtype']}: skipped: {r['skipped']}")
            continue
        what = "max_memory_allocated" if gpu else "peak RSS"
        print(f"{r['dtype']} (live model {r['live_dtype']}, sources {r['sources']}, magnitude cache built "
              f"{r['cache_built'] / 2**30:.2f} GiB): planned "
              f"{r['planned_bytes'] / 2**30:.2f} GiB; measured {what} {r['measured_peak'] / 2**30:.2f} GiB "
              f"(after load {r['measured_peak_load'] / 2**30:.2f}); ratio {r['planned_bytes'] / r['measured_peak']:.2f}")
        ps = r["planned_s"]
        print(f"  seconds: load {r['load_s']:.1f}; per trial merge {r['merge_s']:.2f} (plan {ps['merge']:.2f}), "
              f"eval {r['eval_s']:.2f} (plan {ps['eval']:.2f}), wall {r['trial_s']:.2f}; "
              f"{3600 / r['trial_s']:.0f} trials/hour over {r['trials']} trials")
        if r["note"]:
            print(f"  note: {r['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
