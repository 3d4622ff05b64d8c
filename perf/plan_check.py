"""``brmerge plan``'s prediction against the real worker, on CPU.

For randomly initialised Llama- and Mistral-shaped models of about 0.1B, 0.25B and 0.5B
parameters (bfloat16 checkpoints, Mistral's real tokenizer, two fine-tunes), a child process
per case builds ``search.worker.TrialWorker`` as a search does and records its peak resident
memory (psutil, sampled every 2 ms in a thread; torch's allocations are invisible to
tracemalloc) in each phase: load (sources and live model), the first merge (which also
builds the magnitude cache), the first evaluation; then the seconds of one trial
(``TrialWorker.run``: merge + evaluation, the fastest of three) and the calibration timings of
``brmerge plan --calibrate`` (a new recipe's plan, its merge, a forward of the largest batch;
each the fastest of three: on a machine shared with other work, the fastest run is the one
least slowed by it, on both sides). The plan
(``search.sizing_report.plan_campaign``) predicts each phase's peak from the configs and items
alone, and each trial's seconds from the calibration: the case's own by default (then the
merge is close to its own measurement, and the evaluation is the FLOP model's extrapolation
from the largest batch to every batch and prefix), or with ``--extrapolate`` the smallest
case's of the same method (then the larger models are extrapolations too; on a shared
2-core machine the small case's timings are the noisiest). The
linear merge a campaign can search is task arithmetic (plain ``linear`` ignores the base, so
a campaign refuses it); it stands for linear here.

Targets: memory within +-15%, seconds within +-30%. Run from the repository root:

    .venv/bin/python perf/plan_check.py            # 6 cases: 3 sizes x (llama + task arithmetic, mistral + ties)
    .venv/bin/python perf/plan_check.py --quick    # the 0.1B pair only
    .venv/bin/python perf/plan_check.py --all      # 12 cases: every family with every method
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MEM_TOL, SEC_TOL = 0.15, 0.30
EVAL = {"suite": "sample", "limit": 2, "num_fewshot": 1, "stage1": False}


def _campaign(folders: dict[str, str], method: str):
    from search.campaign import parse_campaign

    params = {"weight": [0.0, 1.0]} if method == "task_arithmetic" else {"weight": [0.0, 1.0], "density": [0.1, 1.0]}
    return parse_campaign({"name": "check", "base_model": folders["base"],
                           "models": [folders["ft1"], folders["ft2"]], "method": method,
                           "search": {"granularity": "global", "params": params}, "eval": EVAL,
                           "workers": {"gpus_per_worker": 0, "count": 1}})


class Peak:
    """Peak RSS of this process, sampled in a thread; ``phase`` records one phase's peak."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self.rss()
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def rss(self) -> int:
        return self._proc.memory_info().rss

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    @contextmanager
    def phase(self, out: dict, name: str):
        self.peak = self.rss()
        t0 = time.perf_counter()
        yield
        out[name] = {"peak": max(self.peak, self.rss()), "seconds": time.perf_counter() - t0}


def measure(folders: dict[str, str], method: str, threads: int) -> dict:
    """Run in a child: the worker's phases, as a search runs them."""
    peak = Peak()
    import torch

    from evals import kv
    from search.genome import GenomeSpace
    from search.worker import TrialWorker

    out: dict = {"runtime": peak.rss()}
    campaign = _campaign(folders, method)
    with peak.phase(out, "load"):
        worker = TrialWorker(campaign, 0, threads=threads)
    space = GenomeSpace(campaign, worker.model.config.num_hidden_layers)
    # points inside the ranges (density < 1: magnitude pruning runs, and builds its cache)
    recipe = next(space.to_recipe({n: lo + f * (hi - lo) for n in space.param_names()
                                             for lo, hi in [space.bounds(n)]}) for f in (0.5,))
    with peak.phase(out, "merge"):
        worker.resident.materialize(recipe, worker.model)
    with peak.phase(out, "eval"):
        worker.full.evaluate(worker.model)
    # as TrialWorker.run after its first evaluation: the magnitude cache is sized now, and built
    # by the next merge of a method that prunes by magnitude
    sized = getattr(worker.resident, "size_magnitude_cache", None)
    if sized is not None:
        sized()
        worker._cache_sized = True
    with peak.phase(out, "merge+cache"):
        worker.resident.materialize(space.to_recipe({n: lo + 0.45 * (hi - lo) for n in space.param_names()
                                                     for lo, hi in [space.bounds(n)]}), worker.model)
    with peak.phase(out, "eval+cache"):
        worker.full.evaluate(worker.model)
    merges, evals = [], []
    for f in (0.2, 0.4, 0.8):   # new recipes: merge + full evaluation; the fastest of three trials
        point = space.to_recipe({n: lo + f * (hi - lo) for n in space.param_names() for lo, hi in [space.bounds(n)]})
        result = worker.run(point.to_yaml(), stage=2)
        assert result.error is None, result.error
        merges.append(result.materialize_seconds)
        evals.append(result.eval_seconds)
    out["trial"] = {"merge": min(merges), "eval": min(evals)}
    # calibration, as `brmerge plan --calibrate`: one merge of a new recipe, one forward of the
    # largest batch (the second of two)
    prepares, calib_merges = [], []
    for f in (0.7, 0.9, 0.6):   # the fastest of three new recipes' plans and merges
        third = space.to_recipe({n: lo + f * (hi - lo) for n in space.param_names() for lo, hi in [space.bounds(n)]})
        t0 = time.perf_counter()
        worker.resident.plan(third)
        prepares.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        worker.resident.materialize(third, worker.model)
        calib_merges.append(time.perf_counter() - t0)
    out["calib_prepare"], out["calib_merge"] = min(prepares), min(calib_merges)
    groups = worker.full._groups_for(worker.model, torch.device("cpu"))
    batch, group = max(((b, g) for g in groups for b in g.batches),
                       key=lambda bg: bg[0].input_ids.numel())
    with torch.inference_mode():
        cache = kv.prefix_cache(worker.model, group.prefix, logits_to_keep=1) if group.prefix is not None else None
        times = []
        for _ in range(3):   # the fastest of three forwards
            t0 = time.perf_counter()
            worker.full._forward_last(worker.model, batch, cache)
            times.append(time.perf_counter() - t0)
        out["calib_forward"] = min(times)
    out["calib_batch"] = [int(batch.input_ids.shape[0]), 0 if group.prefix is None else int(group.prefix.shape[1]),
                          int(batch.input_ids.shape[1])]
    return out


def _child(args: list[str]) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def predict(folders: dict[str, str], method: str, rates=None):
    from search import sizing as Z
    from search.sizing_report import plan_campaign

    plan = plan_campaign(_campaign(folders, method), gpu=Z.CPU, rates=rates)
    m = plan.worker.memory
    load = m["runtime"] + m["sources"] + m["live model"]
    # the first trial runs without the magnitude cache (sized after the first evaluation)
    return plan, {"load": load, "merge": load + m["merge scratch"], "eval": load + m["KV"] + m["activations"],
                  "merge+cache": load + m["magnitude cache"] + m["merge scratch"],
                  "eval+cache": load + m["magnitude cache"] + m["KV"] + m["activations"]}


def rates_from(plan, measured: dict):
    """``brmerge plan --calibrate``'s arithmetic on the child's calibration timings."""
    from search.sizing_report import rates_from_timings

    return rates_from_timings(plan, prepare_s=measured["calib_prepare"], merge_s=measured["calib_merge"],
                              forward_s=measured["calib_forward"], batch=tuple(measured["calib_batch"]),
                              kind="cpu")


def _ratio(pred: float, meas: float, tol: float) -> str:
    r = pred / meas if meas else float("inf")
    return f"{r:5.2f}{'' if abs(r - 1) <= tol else ' !'}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the 0.1B cases only")
    p.add_argument("--all", action="store_true", help="both families with both methods")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--extrapolate", action="store_true",
                   help="predict seconds from the calibration of each method's smallest case, not each case's own")
    p.add_argument("--_build", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._build:
        from perf._random_models import build

        root, family, size = args._build
        print(json.dumps({k: str(v) for k, v in build(Path(root), family, size).items()}))
        return 0
    if args._measure:
        print(json.dumps(measure(json.loads(args._measure[0]), args._measure[1], args.threads)))
        return 0

    sizes = ["0.1B"] if args.quick else ["0.1B", "0.25B", "0.5B"]
    pairs = ([(f, m) for f in ("llama", "mistral") for m in ("task_arithmetic", "ties")] if args.all
             else [("llama", "task_arithmetic"), ("mistral", "ties")])
    print(f"plan vs measured on CPU ({args.threads} threads); ratio = predicted / measured; "
          f"'!' = outside +-{MEM_TOL:.0%} (memory) or +-{SEC_TOL:.0%} (seconds)")
    print(f"{'case':<27}{'phase':<12}{'pred GiB':>9}{'meas GiB':>9}{'ratio':>8}   "
          f"{'pred s':>7}{'meas s':>7}{'ratio':>8}")
    held = {"memory": [0, 0], "seconds": [0, 0]}
    calib: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="plan_check_") as tmp:
        for size in sizes:
            for family, method in pairs:
                folder = Path(tmp) / f"{family}-{size}"
                folders = (json.loads((folder / "folders.json").read_text()) if (folder / "folders.json").is_file()
                           else _child(["--_build", str(folder), family, size]))
                (folder / "folders.json").write_text(json.dumps(folders))
                measured = _child(["--_measure", json.dumps(folders), method, "--threads", str(args.threads)])
                plan, mem = predict(folders, method)
                key = method if args.extrapolate else (method, size, family)
                if key not in calib:
                    calib[key] = rates_from(plan, measured)
                plan, _ = predict(folders, method, rates=calib[key])
                sec = plan.worker.seconds
                name = f"{family} {size} {method}"
                for phase in ("load", "merge", "eval", "merge+cache", "eval+cache"):
                    pm, mm = mem[phase], measured[phase]["peak"]
                    ok = abs(pm / mm - 1) <= MEM_TOL
                    held["memory"][0] += ok
                    held["memory"][1] += 1
                    timed = phase in ("merge+cache", "eval+cache")   # steady trials: the cache is built
                    ps = {"merge+cache": sec["merge"], "eval+cache": sec["eval"]}.get(phase, 0.0)
                    ms = {"merge+cache": measured["trial"]["merge"], "eval+cache": measured["trial"]["eval"]}.get(phase, 0.0)
                    if timed:
                        held["seconds"][0] += abs(ps / ms - 1) <= SEC_TOL
                        held["seconds"][1] += 1
                    print(f"{name:<27}{phase:<12}{pm / 2**30:9.2f}{mm / 2**30:9.2f}{_ratio(pm, mm, MEM_TOL):>8}   "
                          + (f"{ps:7.2f}{ms:7.2f}{_ratio(ps, ms, SEC_TOL):>8}" if timed else ""))
                print(f"{'':<27}runtime predicted {plan.worker.memory['runtime'] / 2**30:.2f} GiB, "
                      f"measured {measured['runtime'] / 2**30:.2f} GiB (after imports)")
    print(f"memory within +-{MEM_TOL:.0%}: {held['memory'][0]}/{held['memory'][1]} phases; seconds within "
          f"+-{SEC_TOL:.0%}: {held['seconds'][0]}/{held['seconds'][1]} (calibrated on "
          f"{'each method' + chr(39) + 's smallest case' if args.extrapolate else 'each case, as plan --calibrate'}; "
          "seconds are those of steady trials)")
    return 0 if held["memory"][0] == held["memory"][1] and held["seconds"][0] == held["seconds"][1] else 1


if __name__ == "__main__":
    sys.exit(main())
