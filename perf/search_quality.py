"""Which sampler finds merges that hold up on held-out items: cmaes, tpe, gp and random on the
demo's zoo, each run's chosen merge scored on the test split.

The objective is exactly the demo campaign's (``search.demo.run.campaign_dict``): TIES over the
legal and health specialists of the demo zoo, its per-layer search space, every dev item of
the demo's own synthetic facts at 0 shots, fitness = mean over the two domains of 0.9 x accuracy
+ 0.1 x gold-letter probability. Each run is one in-memory Optuna study driven by ask/tell,
seeded as a campaign is (the three baselines enqueued first; CMA-ES starts at the uniform
merge), one trial at a time; no driver, no SQLite. One ``ResidentModels`` and two
``Evaluator``s (dev, test) serve every run, and scores are cached by recipe digest across runs
(the objective is deterministic), so a genome seen before costs nothing.

Each run **chooses** its merge as a campaign does (the best dev score; the first on a tie) and
that merge is scored on the **test** items, which no run ever searched on. For each sampler it
prints the chosen merges' test score (mean over seeds) and the paired difference from
``random`` seed by seed (every run uses the same zoo, items and baselines; seed s seeds the
sampler, and tpe and gp start from the same random draws as random's seed s), with a
percentile bootstrap interval over seeds; the best dev score after 10/20/40/60 trials is printed too,
marked as the optimistic, selected-on number it is.

    python perf/search_quality.py                                   # 4 samplers x 20 seeds x 60
    python perf/search_quality.py --trials 12 --seeds 2 --samplers cmaes,random   # a quick look
    python perf/search_quality.py --json out.json --cache scores.json
    python perf/search_quality.py --set base_threads=1   # another demo zoo recipe (ZooRecipe fields)
    # the default split over two cores, then one table (about 26 minutes on 2 cores):
    python perf/search_quality.py --samplers cmaes,random --json a.json &
    python perf/search_quality.py --samplers tpe,gp --json b.json; wait
    python perf/search_quality.py --summary-from a.json b.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout

SAMPLERS = ("cmaes", "tpe", "gp", "random")
CHECKPOINTS = (10, 20, 40, 60)
REFERENCE = "random"   # the sampler whose final best the others race to


@dataclass
class Run:
    sampler: str
    seed: int
    scores: list[float | None]          # per trial in order; None: a failed trial
    ask_seconds: float = 0.0            # time in the sampler (ask + tell)
    eval_seconds: float = 0.0           # materialize + evaluate (cache misses only)
    evaluated: int = 0                  # cache misses
    baselines: dict[str, float] = field(default_factory=dict)
    chosen_test: float | None = None    # test score of the trial with the best dev score
    uniform_test: float | None = None   # test score of the uniform merge (trial 1)

    def best_after(self, n: int) -> float:
        seen = [s for s in self.scores[:n] if s is not None]
        return max(seen) if seen else float("nan")

    def trials_to_reach(self, target: float) -> int | None:
        best = float("-inf")
        for i, s in enumerate(self.scores, 1):
            if s is not None:
                best = max(best, s)
            if best >= target:
                return i
        return None


class Objective:
    """The demo campaign's trial, in process: materialize in place, evaluate, weighted score;
    ``test`` scores a recipe on the held-out items (for the chosen merges only)."""

    def __init__(self, *, threads: int, cache: dict[str, float | None], workdir: Path,
                 zoo_set: Sequence[str] = ()):
        import torch

        torch.set_num_threads(threads)
        from transformers import AutoTokenizer

        from evals.harness import Evaluator
        from merge_core.plan import num_layers
        from merge_core.resident import ResidentModels
        from search.campaign import parse_campaign
        from search.demo import facts as F
        from search.demo.run import DOMAINS, NUM_FEWSHOT, campaign_dict
        from search.demo.zoo import ZooRecipe, ensure_zoo

        from perf.zoo_merges import override

        recipe = override(ZooRecipe(), zoo_set)
        zoo = ensure_zoo(recipe, progress=False, log=lambda m: None)
        data_dir = F.write_data_dir(recipe.make_facts()[0], workdir / "data")
        self.campaign = parse_campaign(campaign_dict(zoo, trials=max(CHECKPOINTS), seed=0, data_dir=data_dir),
                                       source="search.demo.run.campaign_dict")
        c = self.campaign
        if c.suite != "dev" or c.stage1 or c.multi_objective:
            raise SystemExit("the demo's campaign changed: update perf/search_quality.py")
        self.resident = ResidentModels(c.base_model, list(c.models), device="cpu")
        self.model = self.resident.load_module()
        src = self.resident.sources[c.base_model]
        self.num_layers = num_layers(src.config, list(src.tensor_files()))
        tokenizer = AutoTokenizer.from_pretrained(str(src.path))
        # the same evaluators as search/worker.py and search/export.py build for this campaign
        domains = [d for d, w in c.objectives.items() if w > 0]
        self.evaluators = {split: Evaluator.for_suite(
            tokenizer, split=split, source="data", data_dir=c.data_dir, domains=domains, limit=c.limit,
            num_fewshot=c.num_fewshot, purpose="search" if split == "dev" else "report")
            for split in ("dev", "test")}
        if c.num_fewshot != NUM_FEWSHOT or set(c.objectives) != set(DOMAINS):
            raise SystemExit("the demo's campaign changed: update perf/search_quality.py")
        self.weights = {d: w for d, w in c.objectives.items() if w > 0}
        self.items = {f"{t.name}": len(t.items) for e in self.evaluators.values() for t in e.suite.tasks}
        self.cache = cache

    def score(self, recipe, split: str = "dev") -> tuple[float | None, bool]:
        """(score or None for a non-finite candidate, whether it was evaluated now)."""
        from evals.fitness import weighted_score

        key = recipe.digest() + ("" if split == "dev" else f":{split}")
        if key in self.cache:
            return self.cache[key], False
        if self.resident.materialize(recipe, self.model):
            score = None
        else:
            score = weighted_score(self.evaluators[split].evaluate(self.model), weights=self.weights)
        self.cache[key] = score
        return score, True

    __call__ = score


def run_one(objective: Objective, sampler_name: str, seed: int, trials: int) -> Run:
    import optuna

    from search import trials as T
    from search.genome import GenomeSpace
    from search.samplers import make_sampler

    space = GenomeSpace(objective.campaign, objective.num_layers)
    baselines = space.baselines()
    sampler = make_sampler(sampler_name, seed=seed, x0=baselines[0][1], n_baselines=len(baselines))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for name, params in baselines:
        T.enqueue_baseline(study, params, name)
    run = Run(sampler=sampler_name, seed=seed, scores=[])
    distributions = space.distributions()
    recipes = []
    for _ in range(trials):
        t0 = time.perf_counter()
        trial = study.ask(distributions)
        t1 = time.perf_counter()
        recipes.append(space.to_recipe(trial.params))
        score, evaluated = objective(recipes[-1])
        t2 = time.perf_counter()
        if evaluated:
            run.eval_seconds += t2 - t1
            run.evaluated += 1
        if score is None:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, score)
        run.ask_seconds += (t1 - t0) + (time.perf_counter() - t2)
        run.scores.append(score)
        name = T.baseline_name(trial)
        if name is not None and score is not None:
            run.baselines[name.rsplit("/", 1)[-1]] = score   # "model:/path/ptbr-tiny-legal" -> the folder
    # the campaign's choice: the best dev score, the first on a tie; then its held-out score
    scored = [(s, -i) for i, s in enumerate(run.scores) if s is not None]
    if scored:
        chosen = -max(scored)[1]
        run.chosen_test = objective.score(recipes[chosen], "test")[0]
    run.uniform_test = objective.score(recipes[0], "test")[0]
    return run


# -- the table ----------------------------------------------------------------------------------

def _mean_sd(values: Sequence[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


BOOTSTRAP = 10_000   # resamples of the seeds for the interval of a mean paired difference


def paired_vs_reference(runs: list[Run], *, reference: str = REFERENCE, level: float = 0.95
                        ) -> dict[str, dict[str, Any]]:
    """Each sampler's chosen-merge test score minus ``reference``'s, seed by seed: the mean and a
    percentile bootstrap interval over seeds (seeded: the same runs print the same interval)."""
    import numpy as np

    ref = {r.seed: r.chosen_test for r in runs if r.sampler == reference}
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r.sampler for r in runs):
        if name == reference:
            continue
        diffs = np.array([r.chosen_test - ref[r.seed] for r in runs if r.sampler == name
                          and r.chosen_test is not None and ref.get(r.seed) is not None])
        if not diffs.size:
            continue
        rng = np.random.default_rng(0)
        means = diffs[rng.integers(0, diffs.size, (BOOTSTRAP, diffs.size))].mean(axis=1)
        low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        out[name] = {"mean": float(diffs.mean()), "ci95": [float(low), float(high)], "n": int(diffs.size),
                     "wins": int((diffs > 0).sum()), "losses": int((diffs < 0).sum())}
    return out


def summarize(runs: list[Run], *, trials: int) -> dict[str, Any]:
    checkpoints = [n for n in CHECKPOINTS if n < trials] + [trials]
    by: dict[str, list[Run]] = {}
    for r in runs:
        by.setdefault(r.sampler, []).append(r)
    ref_runs = by.get(REFERENCE)
    target = statistics.median(r.best_after(trials) for r in ref_runs) if ref_runs else None
    out: dict[str, Any] = {"trials": trials, "checkpoints": checkpoints, "target": target, "samplers": {}}
    for name, rs in by.items():
        out["samplers"][name] = {
            "seeds": [r.seed for r in rs],
            "best_after": {n: [r.best_after(n) for r in rs] for n in checkpoints},
            "trials_to_target": [r.trials_to_reach(target) for r in rs] if target is not None else None,
            "ask_seconds_per_trial": sum(r.ask_seconds for r in rs) / sum(len(r.scores) for r in rs),
            "eval_seconds_per_evaluation": (sum(r.eval_seconds for r in rs) / max(1, sum(r.evaluated for r in rs))),
            "evaluated": sum(r.evaluated for r in rs),
            "failed": sum(s is None for r in rs for s in r.scores),
            "chosen_test": [r.chosen_test for r in rs],
        }
    out["uniform_test"] = next((r.uniform_test for r in runs if r.uniform_test is not None), None)
    out["vs_reference"] = paired_vs_reference(runs)
    # the model-based samplers against each other, as each is against random
    others = [n for n in by if n != REFERENCE]
    out["between"] = {}
    for i, b in enumerate(others):
        for a in others[i + 1:]:
            vs = paired_vs_reference([r for r in runs if r.sampler in (a, b)], reference=b).get(a)
            if vs is not None:
                out["between"][f"{a} - {b}"] = vs
    return out


def _median_reach(reach: Sequence[int | None], budget: int) -> str:
    """The median of trials-to-target over seeds, a seed that never got there counting as
    more than the budget."""
    ordered = sorted(math.inf if x is None else x for x in reach)
    mid = len(ordered) // 2
    value = ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
    return f">{budget}" if math.isinf(value) else f"{value:g}"


def format_summary(summary: dict[str, Any], baselines: dict[str, float]) -> list[str]:
    cps = summary["checkpoints"]
    budget = summary["trials"]
    lines = [f"held-out: the test score of each run's chosen merge (best dev score), minus {REFERENCE}'s "
             "of the same seed", ""]
    head = f"{'sampler':8}{'test score of the chosen merge':>34}{'minus ' + REFERENCE + ' [95% CI]':>32}{'wins/losses':>13}"
    lines += [head, "-" * len(head)]
    for name, s in summary["samplers"].items():
        tests = [x for x in s["chosen_test"] if x is not None]
        vs = summary["vs_reference"].get(name)
        diff = (f"{vs['mean']:+.4f} [{vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f}]" if vs else "-")
        wl = f"{vs['wins']}/{vs['losses']}" if vs else "-"
        lines.append(f"{name:8}{_mean_sd(tests) if tests else '-':>34}{diff:>32}{wl:>13}")
    if summary.get("uniform_test") is not None:
        lines.append(f"uniform merge (the same in every run): test score {summary['uniform_test']:.4f}")
    for pair, vs in summary.get("between", {}).items():
        lines.append(f"{pair:16} test score of the chosen merge, paired by seed: {vs['mean']:+.4f} "
                     f"[{vs['ci95'][0]:+.4f}, {vs['ci95'][1]:+.4f}], {vs['wins']}/{vs['losses']}")
    lines += ["interval: percentile bootstrap over seeds of the mean paired difference "
              f"({BOOTSTRAP} resamples); wins/losses: seeds where the sampler's chosen merge scored "
              f"higher/lower on test than {REFERENCE}'s (or than the second sampler of a pair)", ""]
    lines += ["best dev score after N trials (mean ± sd over seeds; min-max below): the items the "
              "search chose on, an optimistic estimate", ""]
    head = f"{'sampler':8}" + "".join(f"{f'N={n}':>20}" for n in cps) + f"{'to reach target':>22}"
    lines += [head, "-" * len(head)]
    target = summary["target"]
    for name, s in summary["samplers"].items():
        cells = "".join(f"{_mean_sd(s['best_after'][n]):>20}" for n in cps)
        reach = s["trials_to_target"]
        reach_text = (f"{_median_reach(reach, budget)} ({sum(x is not None for x in reach)}/{len(reach)} seeds)"
                      if reach is not None else "-")
        lines.append(f"{name:8}{cells}{reach_text:>22}")
        ranges = "".join(f"{min(v):.4f}-{max(v):.4f}".rjust(20) for v in (s["best_after"][n] for n in cps))
        lines.append(f"{'':8}{ranges}")
    if target is not None:
        lines += ["", "trials each seed needed to reach the target (one column per seed, in seed order):"]
        for name, s in summary["samplers"].items():
            lines.append(f"  {name:8}" + " ".join(f"{x if x is not None else f'>{budget}':>4}"
                                                 for x in s["trials_to_target"]))
    lines.append("")
    if target is not None:
        lines.append(f"target: the median over seeds of {REFERENCE}'s best after {budget} trials = {target:.4f}; "
                     f"'to reach target': the median over seeds of the trials needed (>{budget}: not within the "
                     "budget), and how many seeds reached it")
    lines.append("baselines (trials 1-3 of every run): "
                 + ", ".join(f"{k} {v:.4f}" for k, v in baselines.items()))
    lines.append("sampler cost: " + ", ".join(
        f"{n} {s['ask_seconds_per_trial'] * 1000:.0f} ms/trial" for n, s in summary["samplers"].items())
        + "; evaluation " + ", ".join(
        f"{n} {s['eval_seconds_per_evaluation']:.2f} s" for n, s in summary["samplers"].items()))
    lines.append("tpe and gp draw their first trials with the same seeded random sampler as random, so runs "
                 "of one seed share their start-up genomes (and scores, from the cache)")
    lines.append("fresh evaluations (the rest came from the recipe cache): " + ", ".join(
        f"{n} {s['evaluated']}" for n, s in summary["samplers"].items())
        + "; failed trials: " + str(sum(s["failed"] for s in summary["samplers"].values())))
    return lines


def print_saved(files: Sequence[Path]) -> int:
    """The table of the runs in ``files`` (``--json`` outputs), as one summary."""
    saved = [json.loads(Path(f).read_text()) for f in files]
    runs = [Run(**r) for s in saved for r in s["runs"]]
    keys = {(r.sampler, r.seed) for r in runs}
    if len(keys) != len(runs):
        raise SystemExit("--summary-from: the files hold the same sampler and seed more than once; give each "
                         "run's file once")
    trials = {len(r.scores) for r in runs}
    if len(trials) != 1 or len({json.dumps(r.baselines, sort_keys=True) for r in runs}) != 1:
        raise SystemExit("--summary-from: the files come from runs with other budgets or baselines (another "
                         "zoo?); give files of one configuration")
    for line in format_summary(summarize(runs, trials=trials.pop()), runs[0].baselines):
        print(line)
    for f, s in zip(files, saved):
        load = s.get("load_average")
        print(f"({f}: wall time {s['wall_seconds']:.0f} s"
              + (f", load average at the end {' '.join(f'{x:.2f}' for x in load)})" if load else ")"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=max(CHECKPOINTS), help="trials per run (default 60)")
    parser.add_argument("--seeds", type=int, default=20, help="seeds per sampler: 0..N-1 (default 20)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS),
                        help=f"comma-separated, from {', '.join(SAMPLERS)} (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="JSON file of scores by recipe digest, read first and written at the end")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs and summary here")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the demo's ZooRecipe (repeatable), as perf/zoo_merges.py")
    parser.add_argument("--summary-from", type=Path, nargs="+", default=None, metavar="JSON",
                        help="print the table of earlier runs' --json files again, running nothing; "
                             "several files (say, samplers split over two processes) are one table")
    args = parser.parse_args(argv)
    if args.summary_from is not None:
        return print_saved(args.summary_from)
    names = [s.strip() for s in args.samplers.split(",") if s.strip()]
    bad = [s for s in names if s not in SAMPLERS]
    if bad or not names:
        parser.error(f"--samplers {args.samplers!r}: choose from {', '.join(SAMPLERS)}")
    if args.trials < 4 or args.seeds < 1:
        parser.error("--trials must be >= 4 (three baselines come first) and --seeds >= 1")

    import optuna
    from transformers.utils import logging as hf_logging

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hf_logging.disable_progress_bar()

    cache: dict[str, float | None] = {}
    if args.cache is not None and args.cache.is_file():
        cache = json.loads(args.cache.read_text())
    start = time.perf_counter()
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="brmerge-search-quality-"))
    objective = Objective(threads=args.threads, cache=cache, workdir=workdir, zoo_set=args.set)
    setup = time.perf_counter() - start
    runs: list[Run] = []
    for name in names:
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            run = run_one(objective, name, seed, args.trials)
            runs.append(run)
            print(f"{name:7} seed {seed}: best dev {run.best_after(args.trials):.4f}, its test "
                  f"{run.chosen_test if run.chosen_test is not None else float('nan'):.4f} "
                  f"({run.evaluated} evaluated, {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    wall = time.perf_counter() - start
    summary = summarize(runs, trials=args.trials)
    print(f"search quality on the demo zoo: {', '.join(names)}; {args.seeds} seeds x {args.trials} trials; "
          f"{objective.num_layers} layers x 2 models x 2 params = "
          f"{2 * 2 * objective.num_layers} coefficients; dev items "
          + ", ".join(f"{k} {v}" for k, v in objective.items.items()))
    print()
    for line in format_summary(summary, runs[0].baselines):
        print(line)
    load = os.getloadavg()
    print(f"wall time {wall:.0f} s (set-up {setup:.0f} s) on {os.cpu_count()} CPUs, "
          f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("note: the best of N noisy trials is optimistic on dev, the items the search chose on; the "
          "test column is each run's chosen merge on items no run searched on")
    if args.cache is not None:
        args.cache.write_text(json.dumps(cache))
    if args.json is not None:
        args.json.write_text(json.dumps({"summary": summary, "wall_seconds": wall, "load_average": load,
                                         "runs": [r.__dict__ for r in runs]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
