"""``brmerge demo``: everything brmerge does, end to end on a 2-core CPU, with an honest result.

1. the model zoo (``search.demo.zoo``): a tiny base and a legal and a health specialist, cached,
   trained on the demo's own synthetic facts (``search.demo.facts``);
2. the demo's items written into the campaign directory (``data/``): every fact asked in two
   dev phrasings and, for the held-out test split, in two other phrasings;
3. the three source models scored directly by the real evaluator;
4. a real campaign: the local executor (no Ray), SQLite study in the campaign directory, TPE
   over per-layer TIES weights, densities and lambda, the equal-weight merge queued first;
5. the export of the best merge: re-scored, scored on the held-out test items with the
   baselines, its model card; the verdicts come from there (test split, paired weighted-score
   tests, Holm over the three rivals, intersection-union for "beats all");
6. the table, the report, ``summary.json`` (rows, verdicts, counts, wall time, export path).
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merge_core.errors import BrmergeError
from search.demo.table import DOMAINS, Row, claim, format_table, rival_label, verdict_lines

__all__ = ["DOMAINS", "NUM_FEWSHOT", "DemoError", "run_demo"]
from search.demo.zoo import MODEL_NAMES, SPECIALISTS, Zoo, ZooRecipe, ensure_zoo

CAMPAIGN_NAME = "demo"
DEFAULT_DIR = Path("campaigns") / CAMPAIGN_NAME
DEFAULT_TRIALS = 80      # TPE's best dev score still rises between 40 and 60 trials (perf/search_quality.py)
MARKER = ".brmerge-demo"  # a directory holding it is a demo's own, safe to replace
SUMMARY = "summary.json"
# Zero-shot prompts: the specialists learned single questions; a 4-layer model trained on
# those does not carry what it learned over to 3-shot prompts, which are 4x longer.
NUM_FEWSHOT = 0
DATA_DIR = "data"        # the demo's generated items, inside the campaign directory
HONESTY = ("The items are the demo's own synthetic facts (made-up laws and syndromes), not exam "
           "questions. Each specialist was fine-tuned on its domain's facts (prose and the dev "
           "questions); the test questions ask the same facts in other words, never seen in "
           "training. The search selected the merge on the dev items; only the test items decide "
           "a verdict.")


class DemoError(BrmergeError):
    pass


@dataclass
class Demo:
    directory: Path
    rows: list[Row]
    trials: int
    wall_seconds: float
    export: Path
    report: Path
    claim: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


# -- small helpers ----------------------------------------------------------------------------

def _prepare_directory(directory: Path) -> None:
    """An empty directory, or a previous demo's (replaced); anything else is refused."""
    if directory.exists():
        if not directory.is_dir():
            raise DemoError(f"--dir {directory} is a file: give a directory for the demo campaign")
        if any(directory.iterdir()) and not (directory / MARKER).is_file():
            raise DemoError(f"--dir {directory} is not empty and was not made by `brmerge demo`: "
                            "give a new or empty directory")
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    (directory / MARKER).write_text("made by `brmerge demo`; the next demo run here replaces it\n")


def _quiet_libraries() -> None:
    """The demo draws its own bars: transformers' per-load bars and Optuna's info lines would
    bury them (this process only; the libraries' settings, not their code)."""
    import optuna
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    optuna.logging.set_verbosity(optuna.logging.WARNING)


@contextmanager
def _ticking(desc: str, *, enabled: bool) -> Iterator[None]:
    """An elapsed-time bar for a step whose progress cannot be counted (Ray start, report)."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, total=None, bar_format="{desc}: {elapsed}", disable=not enabled,
               file=sys.stderr, leave=False)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(0.5):
            bar.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.close()


def _domain_entry(acc: float, gold_prob: float, n: int) -> dict[str, Any]:
    from evals.fitness import domain_score
    from evals.results import TaskMetrics
    from search.evidence import accuracy

    score = domain_score(TaskMetrics(domain="", acc=acc, n=n, chance=0.0, gold_prob=gold_prob))
    return {**accuracy(round(acc * n), n), "acc": acc, "gold_prob": gold_prob, "score": score}


# -- the steps --------------------------------------------------------------------------------

def evaluate_sources(zoo: Zoo, data_dir: Path, *, progress: bool) -> list[Row]:
    """The base and the specialists, scored by the evaluator the campaign's workers use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.fitness import weighted_score
    from evals.harness import Evaluator
    from search.demo.zoo import progress_bar
    from search.scoring import per_item

    tokenizer = AutoTokenizer.from_pretrained(str(zoo.base))
    evaluator = Evaluator.for_suite(tokenizer, split="dev", source="data", data_dir=data_dir,
                                    domains=list(DOMAINS), limit=None, num_fewshot=NUM_FEWSHOT,
                                    purpose="search")
    models = [("base", "base model", zoo.base)]
    models += [(d, f"{d} specialist", zoo.specialists[d]) for d in SPECIALISTS]
    rows = []
    bar = progress_bar(len(models), "scoring the source models", progress, unit="model")
    try:
        for key, name, path in models:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            result = evaluator.evaluate(model)
            domains = {m.domain: _domain_entry(m.acc, m.gold_prob, m.n) for m in result.tasks.values()}
            items = {d: list(v) for d, v in per_item(result)[0].items()}
            rows.append(Row(key=key, name=name, source="direct evaluation", domains=domains,
                            combined=weighted_score(result, weights={d: 1.0 for d in DOMAINS}),
                            model=str(path), items=items))
            bar.update(1)
    finally:
        bar.close()
    return rows


def campaign_dict(zoo: Zoo, *, trials: int, seed: int, data_dir: Path, sampler: str | None = None) -> dict[str, Any]:
    from search.campaign import DEFAULTS

    return {
        "name": CAMPAIGN_NAME,
        "base_model": str(zoo.base),
        "models": [str(zoo.specialists[d]) for d in SPECIALISTS],
        # TIES keeps each task vector's largest entries, then averages where both are kept:
        # at full density and lambda 1 (the uniform merge) each specialist's update is roughly
        # halved. lambda, searched per layer, scales the merged update back up: at 2 with equal
        # weights it is about the sum of both updates (perf/zoo_merges.py: base + 1.0 legal +
        # 1.0 health keeps most of both skills on test)
        "method": "ties",
        "search": {"granularity": "layer",
                   "params": {"weight": [0.0, 2.0], "density": [0.1, 1.0], "lambda": [0.5, 3.0]},
                   "split_attn_mlp": False},
        "sampler": sampler or DEFAULTS["sampler"],   # None: the campaign default (docs/campaigns.md)
        "objectives": {d: 1.0 for d in DOMAINS},
        # every dev item of the demo's own data, one stage: scoring them all is cheap here
        "eval": {"suite": "dev", "data_dir": str(data_dir), "limit": None, "stage1": False,
                 "num_fewshot": NUM_FEWSHOT},
        "budget": {"trials": trials},
        # one worker in this process with every core: a trial takes about a second, so Ray's
        # start-up (~10 s) and a second worker's copy of the models would cost more than they save
        "workers": {"count": "auto", "gpus_per_worker": 0, "executor": "local"},
        "seed": seed,
    }


def run_search(directory: Path, campaign: Mapping[str, Any], *, progress: bool):
    from search.campaign import parse_campaign
    from search.driver import run_campaign

    path = directory / "campaign.yaml"
    path.write_text(yaml.safe_dump(dict(campaign), sort_keys=False))
    parsed = parse_campaign(yaml.safe_load(path.read_text()), source=str(path))
    return run_campaign(parsed, directory, progress=progress, log=None)


def trial_row(t, *, key: str, name: str) -> Row:
    from search import trials as T
    from search.trials import scalar

    domains = {d: _domain_entry(v["acc"], v["gold_prob"], v["n"])
               for d, v in T.domains_of(t).items()}
    return Row(key=key, name=name, source="study trial", domains=domains, combined=scalar(t), trial=t.number,
               baseline=T.baseline_name(t), items=T.item_bits(t))


def study_rows(study) -> list[Row]:
    from search import trials as T
    from search.trials import baselines, best_trials

    found = baselines(study)
    if "uniform" not in found or not best_trials(study, 1):
        raise DemoError("the campaign finished without a completed uniform-merge trial: see campaign.log")
    uniform = found["uniform"]
    best = best_trials(study, 1)[0]
    base = T.baseline_name(best)
    name = f"best merge (trial {best.number}: {base})" if base else f"best searched merge (trial {best.number})"
    return [trial_row(uniform, key="uniform", name=f"uniform merge (trial {uniform.number})"),
            trial_row(best, key="best", name=name)]


def _test_entries(export_row: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], float | None]:
    from search.evidence import accuracy

    out = {}
    for task, m in (export_row.get("test_domains") or {}).items():
        domain = m.get("domain", task)
        n = int(m["n"])
        out[domain] = {**accuracy(round(m["acc"] * n), n), "acc": m["acc"]}
    return out, export_row.get("test")


def with_test_scores(rows: list[Row], export_rows: list[dict[str, Any]], specialists: Mapping[str, str]) -> list[Row]:
    """The rows with the export's test scores: the exported merge's, and each baseline trial's
    (a specialist's row shows its baseline trial's, the specialist as a merge)."""
    from dataclasses import replace

    by_label = {"best": export_rows[0]}
    for r in export_rows[1:]:
        label = rival_label(r["name"], specialists)
        key = {"uniform merge": "uniform", **{f"{d} specialist": d for d in SPECIALISTS}}.get(label or "")
        if key:
            by_label[key] = r
    out = []
    for row in rows:
        found = by_label.get(row.key)
        if found is not None:
            test, combined = _test_entries(found)
            row = replace(row, test=test, test_combined=combined)
        out.append(row)
    return out


def write_summary(demo: Demo, *, seed: int, zoo: Zoo, budget: int, counts: Mapping[str, int],
                  gap: Mapping[str, Any] | None) -> Path:
    from search.storage import default_url

    data = {
        "command": "brmerge demo",
        "seed": seed,
        "trials": demo.trials,
        "budget_trials": budget,
        "counts": dict(counts),
        "wall_seconds": demo.wall_seconds,
        "timings": demo.timings,
        "export": str(demo.export),
        "report": str(demo.report),
        "study": {"name": CAMPAIGN_NAME, "storage": default_url(demo.directory)},
        "zoo": {"root": str(zoo.root), "built_now": zoo.built, "models": MODEL_NAMES},
        "data": str(demo.directory / DATA_DIR),
        "rows": [{k: v for k, v in asdict(r).items() if k != "items"} for r in demo.rows],
        "claim": demo.claim,
        "generalization_gap": gap,
        "note": HONESTY,
    }
    from search.campaign_files import replace_text

    return replace_text(demo.directory / SUMMARY, json.dumps(data, indent=2), root=demo.directory)


# -- the whole demo ---------------------------------------------------------------------------

def run_demo(*, directory: Path = DEFAULT_DIR, trials: int = DEFAULT_TRIALS, seed: int = 0,
             progress: bool = True, cache_dir: Path | None = None, zoo_recipe: ZooRecipe | None = None,
             echo: Callable[[str], None] = print, sampler: str | None = None) -> Demo:
    if trials < 4:
        raise DemoError(f"--trials {trials}: the three baselines take three trials; give at least 4")
    start = time.perf_counter()
    timings: dict[str, float] = {}
    directory = Path(directory).resolve()
    _prepare_directory(directory)
    _quiet_libraries()

    def step(name: str, t0: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - t0, 2)
        return now

    t = time.perf_counter()
    recipe = zoo_recipe or ZooRecipe(seed=seed)
    zoo = ensure_zoo(recipe, cache_dir=cache_dir, progress=progress, log=lambda m: None)
    echo(f"model zoo {'trained' if zoo.built else 'reused from the cache'}: {zoo.root}")
    from search.demo import facts as F

    data_dir = F.write_data_dir(recipe.make_facts()[0], directory / DATA_DIR)
    echo(f"the demo's items (synthetic facts; dev and test ask them in different words): {data_dir}")
    t = step("zoo", t)
    sources = evaluate_sources(zoo, data_dir, progress=progress)
    t = step("score sources", t)
    study = run_search(directory, campaign_dict(zoo, trials=trials, seed=seed, data_dir=data_dir, sampler=sampler),
                       progress=progress)
    t = step("search", t)
    from search import verdicts as V
    from search.evidence import selection_note
    from search.export import export_trial
    from search.trials import finished_trials

    rows = sources + study_rows(study)
    best = next(r for r in rows if r.key == "best")
    out = directory / "best-merge"
    export_trial(directory, out=out, trial=best.trial, device="cpu", progress=progress, log=lambda m: None)
    record = V.export_history(directory)[-1]
    echo(f"best merge exported, re-scored on dev (identical), scored on the held-out test items with "
         f"the baselines, model card written: {out}")
    t = step("export", t)

    specialists = {d: str(zoo.specialists[d]) for d in SPECIALISTS}
    rows = with_test_scores(rows, record["rows"], specialists)
    # the export's own comparisons on the dev items that selected the trial (no verdict)
    dev = {r["name"]: (r.get("exported_minus_this") or {}).get("dev") for r in record["rows"][1:]}
    verdict = claim(rows, record["verdicts"], dev, specialists)
    for line in format_table(rows):
        echo(line)
    for line in verdict_lines(verdict):
        echo(line)
    counts = V.search_counts(study, directory)
    echo("note: " + selection_note(len(finished_trials(study)), counts))
    echo(HONESTY)

    from search.report import write_report

    with _ticking("writing the report", enabled=progress):
        report = write_report(directory)
    echo(f"report: {report.html}")
    t = step("report", t)

    echo(f"dashboard: brmerge dashboard {directory}   (then open http://127.0.0.1:8080)")
    demo = Demo(directory=directory, rows=rows, trials=len(finished_trials(study)),
                wall_seconds=round(time.perf_counter() - start, 2), export=out, report=report.html,
                claim=verdict, timings=timings)
    path = write_summary(demo, seed=seed, zoo=zoo, budget=trials, counts=counts,
                         gap=record.get("generalization_gap"))
    echo(f"summary: {path} ({demo.trials} trials, {demo.wall_seconds:.0f} s)")
    return demo
