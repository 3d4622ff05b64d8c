"""The share of a trial's wall time spent outside evaluation, on small real models.

Builds a Llama-style base (hidden 256, 4 layers, vocab 4096 by default; a BPE tokenizer
trained on the sample suite's prompts, so prompts have realistic token counts) and two
"fine-tunes" of it with ``search/demo/tiny.py``, then runs a short real campaign: ``search.driver``
with the real ``search.worker.TrialWorker`` (one worker on the CPU, resident models, the
resident evaluator on the sample suite's dev split), SQLite study as by default.

From the driver side, per trial, it reads the study's own clocks: Optuna's ``datetime_start``
(set by ``ask``) and ``datetime_complete`` (set by ``tell``), and the driver's user attributes
``started_at`` (job submitted) / ``finished_at`` (recorded), ``materialize_seconds`` and
``eval_seconds`` (measured in the worker). With one worker the trials run back to back, so the
loop's wall time (first ask, or the moment the worker is ready if the driver asked the first
trial during its start-up, to last tell) is split exactly into (a driver that asks the next
trial ahead overlaps them; then only materialize / eval / other are shown):

- materialize, eval: inside the worker;
- ask + prepare: ``datetime_start`` -> ``started_at`` (sampling, recipe, two attribute writes);
- Ray + result attrs: the rest of ``started_at`` -> ``finished_at`` (round trip, recipe parse
  in the worker, and the driver's first six result attribute writes);
- record + tell: ``finished_at`` -> ``datetime_complete``;
- between trials: ``datetime_complete`` -> the next ``datetime_start`` (loop bookkeeping).

Target: everything but eval under 10% of the wall time.

    python perf/trial_overhead.py [--trials 12 --hidden 256 --layers 4 --vocab 4096]
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Ray generates an auth token unless told otherwise; a private loopback cluster needs none.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout

import optuna  # noqa: E402

from benchmarks_ptbr.suite import load_suite  # noqa: E402
from search import trials as T  # noqa: E402
from search.campaign import parse_campaign  # noqa: E402
from search.demo.tiny import llama_config, make_llama, make_tokenizer  # noqa: E402


@dataclass
class TrialTimes:
    number: int
    begin: float        # datetime_start (epoch seconds)
    complete: float     # datetime_complete
    ask: float          # datetime_start -> started_at
    materialize: float
    eval: float
    ray: float          # started_at -> finished_at, minus materialize and eval
    tell: float         # finished_at -> datetime_complete
    gap: float          # datetime_complete -> next trial's datetime_start (0 for the last)


def build_models(root: Path, *, vocab: int, hidden: int, layers: int) -> tuple[Path, Path, Path]:
    suite = load_suite(split="dev", source="sample")
    corpus = [t.context(i) for t in suite.tasks for i in t.items]
    make_tokenizer(root / "tok", vocab_size=vocab, corpus=corpus)
    config = llama_config(vocab_size=vocab, hidden=hidden, layers=layers, heads=max(1, hidden // 64))
    config.max_position_embeddings = 4096  # few-shot prompts fit without truncation
    base = make_llama(root / "base", config=config, tokenizer_dir=root / "tok")
    ft1 = make_llama(root / "ft1", like=base, seed=1, tokenizer_dir=root / "tok")
    ft2 = make_llama(root / "ft2", like=base, seed=2, tokenizer_dir=root / "tok")
    return base, ft1, ft2


def trial_times(study: optuna.Study) -> list[TrialTimes]:
    """Per-trial split of the loop's wall time, from the study's clocks (see the module doc)."""
    trials = sorted((t for t in study.get_trials(deepcopy=False)
                     if t.state == optuna.trial.TrialState.COMPLETE and T.view(t).started_at is not None),
                    key=lambda t: t.datetime_start)
    out = []
    for i, t in enumerate(trials):
        v = T.view(t)
        begin = t.datetime_start.timestamp()
        complete = t.datetime_complete.timestamp()
        started, finished = v.started_at, v.finished_at
        mat, ev = v.materialize_seconds, v.eval_seconds
        nxt = trials[i + 1].datetime_start.timestamp() if i + 1 < len(trials) else complete
        out.append(TrialTimes(t.number, begin, complete, started - begin, mat, ev,
                              finished - started - mat - ev, complete - finished, nxt - complete))
    return out


def report(times: list[TrialTimes], label: str, *, since: float | None = None) -> float:
    """Split the wall time from ``since`` (default: the first ask) to the last tell.

    Clocks, not phase sums, give the wall time: a driver that asks ahead overlaps trials.
    """
    wall = times[-1].complete - (times[0].begin if since is None else since)
    mat, ev = sum(t.materialize for t in times), sum(t.eval for t in times)
    n = len(times)
    print(f"{label}: {n} trials, {wall:.2f} s to the last tell, {wall / n:.3f} s per trial")
    for name, seconds in (("materialize", mat), ("eval", ev), ("other (ask/tell, Ray, bookkeeping)",
                                                                 wall - mat - ev)):
        print(f"  {name:<36} {seconds / n:7.3f} s/trial  {100 * seconds / wall:5.1f}%")
    overlap = any(t.gap < 0 for t in times)
    if overlap:
        print("  (trials overlap: the driver asks ahead, so 'other' is not split per phase)")
    else:
        rest = wall - mat - ev
        for name, attr in (("  of which ask + prepare", "ask"), ("  of which Ray + result attrs", "ray"),
                           ("  of which record + tell", "tell")):
            seconds = sum(getattr(t, attr) for t in times)
            rest -= seconds
            median = statistics.median(getattr(t, attr) for t in times)
            print(f"  {name:<36} {seconds / n:7.3f} s/trial  {100 * seconds / wall:5.1f}%"
                  f"  (median {median:.3f})")
        print(f"  {'  of which between trials':<36} {rest / n:7.3f} s/trial  {100 * rest / wall:5.1f}%")
    outside = 1 - ev / wall
    print(f"  outside evaluation: {100 * outside:.1f}% of the trial's wall time "
          f"(target < 10%: {'met' if outside < 0.10 else 'MISSED'})")
    return outside


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=12, help="budget, 3 baselines included (default 12)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--method", default="ties")
    parser.add_argument("--sampler", default="cmaes")
    parser.add_argument("--suite", choices=("sample", "dev"), default=None,
                        help="dev (the exam data: --data-dir or $BRMERGE_DATA_DIR or ../shared/data/ptbr; "
                             "the default when found) or sample (15 dev items per domain)")
    parser.add_argument("--data-dir", default=None, help="PT-BR data directory for --suite dev")
    parser.add_argument("--limit", type=int, default=None,
                        help="items per task (default: 50 on dev, all 15 on the sample dev split; no stage 1)")
    parser.add_argument("--stage1", type=int, default=None, help="stage-1 items (needs --limit)")
    parser.add_argument("--driver", default="search.driver",
                        help="module holding Driver (default search.driver); name a patched copy on "
                             "PYTHONPATH to measure a change")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    driver_module = importlib.import_module(args.driver)
    repo_data = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptbr"
    data_dir = args.data_dir or os.environ.get("BRMERGE_DATA_DIR") or (str(repo_data) if repo_data.is_dir() else None)
    suite = args.suite or ("dev" if data_dir else "sample")
    if suite == "dev" and not data_dir:
        parser.error("--suite dev needs --data-dir (or $BRMERGE_DATA_DIR)")
    limit = args.limit if args.limit is not None else (50 if suite == "dev" else None)

    with tempfile.TemporaryDirectory(prefix="brmerge-overhead-") as tmp:
        root = Path(tmp)
        base, ft1, ft2 = build_models(root / "models", vocab=args.vocab, hidden=args.hidden,
                                      layers=args.layers)
        campaign = parse_campaign({
            "name": "overhead", "base_model": str(base), "models": [str(ft1), str(ft2)],
            "method": args.method, "sampler": args.sampler,
            "objectives": {"legal": 1.0, "health": 1.0, "enem": 1.0},
            "eval": {"suite": suite, "limit": limit, "stage1": args.stage1,
                     "data_dir": data_dir if suite == "dev" else None},
            "budget": {"trials": args.trials}, "workers": {"count": 1, "gpus_per_worker": 0}, "seed": 0,
        }, source="trial_overhead")
        load = os.getloadavg()
        print(f"model: Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab}, {args.method} "
              f"of 2 fine-tunes, CPU, 1 worker; {suite} suite dev split, limit {limit or 'all'}, stage 1 "
              f"{campaign.stage1 or 'off'}; sampler {args.sampler}; driver {args.driver}; "
              f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        t0 = time.perf_counter()
        driver = driver_module.Driver(campaign, root / "campaign", progress=False)
        study = driver.run()
        total = time.perf_counter() - t0
        # the first trials are asked while the worker loads its models: the loop starts
        # when the worker is ready (start-up excluded, as before asking ahead began)
        loop_start = getattr(driver, "loop_started", None)
        times = trial_times(study)
        load = os.getloadavg()
        print(f"campaign: {total:.1f} s in all (Ray and worker start-up included); "
              f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        import ray

        ray.shutdown()
    if not times:
        print("no completed trials: see the campaign log")
        return 1
    first = times[0].begin if loop_start is None else max(times[0].begin, loop_start)
    report(times, "all trials (from the moment the worker was ready)", since=first)
    if len(times) > 2:
        # the first trial builds the evaluator's device batches and the first plan: a one-off
        report(times[1:], "steady state (after the first trial's tell)", since=times[0].complete)
    return 0


if __name__ == "__main__":
    sys.exit(main())
