"""Worker utilization: brmerge's asynchronous driver versus a generation-barrier loop.

Four Ray actors run synthetic trials (``perf._synthetic.SleepWorker``: each trial sleeps a
seeded lognormal duration, no model). The same number of trials is run, in one process and
one local Ray, by

- (a) ``search.driver.Driver`` itself (asynchronous ask/tell, SQLite study, its own actors),
- (b) a generation-barrier loop written here: ask 4 trials, run them on the 4 actors, wait
  for all 4, tell all 4, repeat (the same study setup, sampler, baselines and storage).

Utilization = busy time of the workers (their own sleep intervals) / (workers x wall time of
the loop), the wall time running from the moment the last actor is ready (start-up excluded)
to the end of the loop (before its actors are killed). Target: asynchronous >= 90%. The idle
time is split into before the first trial, between trials (what scheduling costs) and after
the last (the budget's tail: once every trial is handed out, workers that finish wait for
the slowest; it is a fixed cost, so it weighs less the longer the campaign).

The default budget is 200 trials, that of the example campaign in docs/campaigns.md; with
``--trials 48`` the tail alone is about 9% of the worker time.

Staged evaluation is disabled (``eval.limit: null``): every trial is one run on one actor, so
both loops do the same work per trial and only the scheduling differs.

    python perf/scheduling.py [--trials 200 --workers 4 --median 1.0 --sigma 0.5 --sampler cmaes]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Ray generates an auth token unless told otherwise; a private loopback cluster needs none.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout

import optuna  # noqa: E402

from perf._synthetic import MEDIAN_ENV, SIGMA_ENV, TRACE_ENV, SleepWorker  # noqa: E402
from search.campaign import Campaign, parse_campaign  # noqa: E402
from search.genome import GenomeSpace  # noqa: E402
from search.executor import start_ray  # noqa: E402
from search.samplers import make_sampler  # noqa: E402
from search.storage import open_study  # noqa: E402
from search import trials as T  # noqa: E402
from search.trials import finished_trials  # noqa: E402
from search.demo.tiny import llama_config, make_llama, make_tokenizer  # noqa: E402


@dataclass
class LoopStats:
    name: str
    trials: int
    runs: int
    wall: float        # seconds, last actor ready -> loop returned
    busy: float        # seconds the workers spent inside run(), summed
    workers: int
    load: tuple[float, float, float]
    idle: tuple[float, float, float]  # worker-seconds idle before the first run, between runs, after the last

    @property
    def utilization(self) -> float:
        return self.busy / (self.workers * self.wall)


def build_models(root: Path) -> tuple[Path, Path, Path]:
    """A tiny base and two 'fine-tunes': the driver reads the base's config for its layers."""
    make_tokenizer(root / "tok")
    base = make_llama(root / "base", config=llama_config(layers=4), tokenizer_dir=root / "tok")
    ft1 = make_llama(root / "ft1", like=base, seed=1)
    ft2 = make_llama(root / "ft2", like=base, seed=2)
    return base, ft1, ft2


def campaign_for(name: str, models: tuple[Path, Path, Path], *, trials: int, workers: int,
                 sampler: str, seed: int) -> Campaign:
    base, ft1, ft2 = models
    return parse_campaign({
        "name": name, "base_model": str(base), "models": [str(ft1), str(ft2)], "method": "ties",
        "sampler": sampler, "objectives": {"legal": 1.0, "health": 1.0, "enem": 1.0},
        "eval": {"suite": "sample", "limit": None},  # no limit: no stage 1, one run per trial
        "budget": {"trials": trials}, "workers": {"count": workers, "gpus_per_worker": 0},
        "seed": seed,
    }, source=name)


def read_trace(trace_dir: Path, name: str) -> tuple[float, dict[int, list[tuple[float, float]]]]:
    """(moment the last actor was ready, run intervals per worker) recorded by the workers of
    ``name``."""
    ready: list[float] = []
    runs: dict[int, list[tuple[float, float]]] = {}
    for path in sorted(trace_dir.glob(f"{name}.worker-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            if entry["event"] == "ready":
                ready.append(entry["t"])
            else:
                runs.setdefault(entry["worker"], []).append((entry["start"], entry["end"]))
    if not ready:
        raise RuntimeError(f"no worker trace for {name} in {trace_dir}: did the actors import "
                           "perf._synthetic with the trace directory set?")
    return max(ready), runs


def loop_stats(name: str, trials: int, start: float, end: float, runs: dict[int, list[tuple[float, float]]],
               workers: int) -> LoopStats:
    """Busy time, and where the idle time of the workers went, between ``start`` and ``end``."""
    busy = head = gaps = tail = 0.0
    for w in range(workers):
        spans = sorted(runs.get(w, []))
        busy += sum(e - s for s, e in spans)
        if not spans:
            tail += end - start
            continue
        head += max(0.0, spans[0][0] - start)
        gaps += sum(max(0.0, b[0] - a[1]) for a, b in zip(spans, spans[1:]))
        tail += max(0.0, end - spans[-1][1])
    return LoopStats(name, trials, sum(len(v) for v in runs.values()), end - start, busy, workers,
                     os.getloadavg(), (head, gaps, tail))


def run_async(campaign: Campaign, directory: Path, trace_dir: Path, workers: int, driver_module: Any
              ) -> LoopStats:
    driver = driver_module.Driver(campaign, directory, worker_factory=SleepWorker, n_workers=workers,
                                  progress=False)
    study = driver.run()
    end = driver.loop_ended or time.time()  # the loop's end, before actors are killed (as below)
    start, runs = read_trace(trace_dir, campaign.name)
    return loop_stats(f"asynchronous ({driver_module.__name__}.Driver)",
                      len(finished_trials(study)), start, end, runs, workers)


def run_barrier(campaign: Campaign, directory: Path, trace_dir: Path, workers: int, driver_module: Any
                ) -> LoopStats:
    """Ask ``workers`` trials, run them all, wait for all, tell all; repeat until the budget."""
    import ray

    space = GenomeSpace(campaign, num_layers=4)
    baselines = space.baselines()
    sampler = make_sampler(campaign.sampler, seed=campaign.seed, x0=baselines[0][1],
                           n_baselines=len(baselines))
    directory.mkdir(parents=True, exist_ok=True)
    # the driver's own study set-up (storage settings included), so both loops pay alike
    study = open_study(campaign, directory, resume=False, sampler=sampler)
    for name, params in baselines:  # as the driver does, so both studies start alike
        T.enqueue_baseline(study, params, name)
    # the same actor resources as the driver's plan (fractional CPUs: 4 actors on 2 cores)
    cpus = ray.cluster_resources().get("CPU", 1)
    remote = ray.remote(max_restarts=0, max_concurrency=1,
                        num_cpus=cpus / workers if workers > cpus else 1)(SleepWorker)
    actors = [remote.remote(campaign, i, threads=1) for i in range(workers)]
    ray.get([a.info.remote() for a in actors])
    told = 0
    try:
        while told < campaign.trials:
            batch = [study.ask(space.distributions()) for _ in range(min(workers, campaign.trials - told))]
            refs = []
            for actor, trial in zip(actors, batch):
                recipe = space.to_recipe(trial.params)
                # the driver's per-trial bookkeeping, so only the scheduling differs
                T.record_asked(trial, digest=recipe.digest(), recipe_yaml=recipe.to_yaml())
                refs.append(actor.run.remote(recipe.to_yaml(), stage=1))
            results = ray.get(refs)  # the barrier: every worker waits for the slowest trial
            for trial, result in zip(batch, results):
                T.record_final(trial, score=result.score, items=result.items)
                study.tell(trial, result.score)
            told += len(batch)
        end = time.time()
    finally:
        for a in actors:
            ray.kill(a)
    start, runs = read_trace(trace_dir, campaign.name)
    return loop_stats("generation barrier (this script)", len(finished_trials(study)),
                      start, end, runs, workers)


def report(stats: LoopStats) -> None:
    ideal = stats.busy / stats.workers
    print(f"{stats.name}:")
    print(f"  trials {stats.trials} ({stats.runs} worker runs), wall {stats.wall:.2f} s "
          f"(ideal {ideal:.2f} s), busy {stats.busy:.2f} s over {stats.workers} workers, "
          f"{stats.trials / stats.wall:.2f} trials/s")
    print(f"  worker utilization {100 * stats.utilization:.1f}%  "
          f"(load average at end {stats.load[0]:.2f} {stats.load[1]:.2f} {stats.load[2]:.2f})")
    total = stats.workers * stats.wall
    head, gaps, tail = stats.idle
    print(f"  idle worker time: {100 * head / total:.1f}% before the first trial, {100 * gaps / total:.1f}% "
          f"between trials, {100 * tail / total:.1f}% after the last (the budget's tail)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--median", type=float, default=1.0, help="median trial seconds (default 1.0)")
    parser.add_argument("--sigma", type=float, default=0.5, help="lognormal shape (default 0.5)")
    parser.add_argument("--sampler", default="cmaes", help="cmaes | tpe | random | ... (default cmaes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--driver", default="search.driver",
                        help="module holding Driver (default search.driver); name a "
                             "patched copy on PYTHONPATH to measure a change against the same loop")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    driver_module = importlib.import_module(args.driver)

    with tempfile.TemporaryDirectory(prefix="brmerge-sched-") as tmp:
        root = Path(tmp)
        models = build_models(root / "models")
        trace_dir = root / "trace"
        trace_dir.mkdir()
        # Actors import perf._synthetic by module path: put the checkout on their PYTHONPATH
        # (the editable install maps brmerge's packages only), and hand them the trace settings.
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TRACE_ENV: str(trace_dir), MEDIAN_ENV: str(args.median), SIGMA_ENV: str(args.sigma),
               "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}
        # The driver's own local-cluster settings; it reuses a Ray that is already initialized.
        start_ray(runtime_env={"env_vars": env})
        import ray   # after start_ray, which must set the loopback settings before ray loads

        try:
            load = os.getloadavg()
            print(f"{args.trials} trials, {args.workers} actors on {os.cpu_count()} CPUs, trial seconds "
                  f"lognormal(median {args.median}, sigma {args.sigma}), sampler {args.sampler}, "
                  f"stage 1 disabled; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
            common = dict(models=models, trials=args.trials, workers=args.workers, sampler=args.sampler,
                          seed=args.seed)
            a = run_async(campaign_for("sched-async", **common), root / "async", trace_dir, args.workers,
                          driver_module)
            report(a)
            b = run_barrier(campaign_for("sched-barrier", **common), root / "barrier", trace_dir,
                            args.workers, driver_module)
            report(b)
        finally:
            ray.shutdown()
    print(f"utilization ratio asynchronous / barrier: {a.utilization / b.utilization:.2f}x; "
          f"target asynchronous >= 90%: {'met' if a.utilization >= 0.9 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
