"""Export a trial: stream its merge to disk, prove it is the model that was searched by
re-scoring it on dev, score the held-out test split, and write the model card.

The dev re-score must equal the trial's score exactly (same weights, same evaluator, same
device type); otherwise nothing is exported.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from merge_core.errors import BrmergeError
from search import evidence as E
from search import verdicts as V
from search import scoring
from search import trials as T
from search.errors import SearchError
from search.campaign import Campaign, load_campaign
from search.campaign_files import replace_text
from search.storage import load_study
from search.trials import baselines, best_trials, scalar


class ExportError(SearchError):
    pass


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    trial: int
    dev_score: float
    test_score: float | None
    rows: list[dict[str, Any]]      # exported model and baselines: name, dev, test, per-domain


def pick_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    if number is None:
        best = best_trials(study, 1)
        if not best:
            raise ExportError("no completed trial to export yet: run `brmerge search` first")
        return best[0]
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise ExportError(f"--trial {number} does not exist: trials are 0..{len(trials) - 1}")
    t = trials[number]
    if t.state != optuna.trial.TrialState.COMPLETE:
        raise ExportError(f"trial {number} is {t.state.name}, not COMPLETE: only fully scored trials "
                          "can be exported (see `brmerge status`)")
    return t


def _score(evaluator, model, campaign: Campaign):
    """(score, {domain: accuracy with its interval}, {domain: per-item correctness}, the
    evaluator's result) of ``model``."""
    res = evaluator.evaluate(model)
    items = scoring.per_item(res)[0]
    domains = {d: E.accuracy(sum(v), len(v)) for d, v in items.items()}
    return scoring.score(campaign, res), domains, items, res


def export_trial(directory: Path, *, out: Path, trial: int | None = None, device: str = "auto",
                 shard_size: str = "5GB", overwrite: bool = False, progress: bool = True,
                 log=print) -> ExportResult:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge_core.devices import resolve_device
    from merge_core.dtypes import torch_dtype
    from merge_core.io import check_output, replace_output
    from merge_core.materialize import merge_to_disk
    from merge_core.recipe import Recipe
    from merge_core.resident import ResidentModels, as_live_module
    from merge_core.staging import remove_stale_staging, staging_path

    directory = Path(directory)
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists: choose another --out or pass --overwrite")
    study = load_study(directory)
    campaign = load_campaign(directory / "campaign.yaml")
    V.export_history(directory)   # a damaged exports.json is refused now, not after the model is written
    chosen = pick_trial(study, trial)
    recipe_yaml = T.view(chosen).recipe
    if not recipe_yaml:
        raise ExportError(f"trial {chosen.number} has no recipe attribute: was it written by brmerge search?")
    recipe = Recipe.from_yaml(recipe_yaml)
    # --overwrite replaces an earlier brmerge output only: never the campaign or a local source
    protected = (directory, *(r for r in recipe.referenced_models() if Path(r).expanduser().exists()))
    check_output(out, overwrite=overwrite, protected=protected)
    dev_device = resolve_device(device)

    remove_stale_staging(out)   # staging folders of exports killed with SIGKILL
    staging = staging_path(out, "export")
    log(f"exporting trial {chosen.number} (dev score {scalar(chosen):.4f}) to {out}")
    merge_to_disk(recipe, staging, device=str(dev_device), shard_size=shard_size, progress=progress,
                  recipe_text=recipe_yaml)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(staging))
        # the trial's live-model dtype (trials from before eval.dtype ran in float32)
        live_dtype = torch_dtype(T.view(chosen).dtype or "float32")
        model = as_live_module(
            AutoModelForCausalLM.from_pretrained(str(staging), dtype=torch.float32), dev_device,
            dtype=live_dtype)
        dev_eval = scoring.evaluator(campaign, tokenizer, split=scoring.search_split(campaign))
        test_eval = scoring.evaluator(campaign, tokenizer, split="test", purpose="report")
        # on a CPU, as many threads as the trial's worker had: a matmul rounds by how it is split
        with _threads(T.view(chosen).threads if dev_device.type == "cpu" else None):
            dev, dev_domains, dev_items, dev_res = _score(dev_eval, model, campaign)
        expected = scalar(chosen)
        if dev != expected:
            raise ExportError(f"re-scoring the exported model on dev gave {dev!r}, the trial scored {expected!r}: "
                              "the export does not reproduce the searched model (different device type or "
                              "library versions?); nothing was exported")
        log(f"dev re-score {dev:.6f} equals trial {chosen.number}'s score: the export is the searched model")
        test, test_domains, test_items, test_res = _score(test_eval, model, campaign)
        # each item's twin group, per split: every model's items come in the same order
        dev_clusters = scoring.item_clusters(dev_eval, dev_res)
        test_clusters = scoring.item_clusters(test_eval, test_res)
        rows = [{"name": f"exported (trial {chosen.number})", "trial": chosen.number, "dev": dev,
                 "test": test, "dev_domains": dev_domains, "test_domains": test_domains,
                 "test_items": T.encode_items(test_items)}]
        del model
        base_trials = baselines(study)
        pairs: dict[str, tuple[dict, dict]] = {}    # baseline: (dev bits, test bits)
        if base_trials:
            resident = ResidentModels(campaign.base_model, list(campaign.models), device=dev_device)
            live = resident.load_module(dtype=live_dtype)
            for name, t in base_trials.items():
                resident.materialize(Recipe.from_yaml(T.view(t).recipe), live)
                b_test, b_test_domains, b_test_items, _ = _score(test_eval, live, campaign)
                rows.append({"name": name, "trial": t.number, "dev": scalar(t), "test": b_test,
                             "dev_domains": E.domain_accuracies(t), "test_domains": b_test_domains,
                             "test_items": T.encode_items(b_test_items)})
                pairs[name] = (T.item_bits(t), b_test_items)
        # verdicts come from the held-out test items only; this export is one more look at them
        counts = V.search_counts(study, directory)
        counts = {**counts, "exports": counts["exports"] + 1, "test_looks": counts["test_looks"] + 1}
        claims = V.export_claims(dev_items, test_items, pairs, scoring.weights(campaign), counts=counts,
                                 test_clusters=test_clusters, dev_clusters=dev_clusters)
        for r in rows[1:]:
            r["exported_minus_this"] = {"dev": claims["dev"].get(r["name"]),
                                        "test": claims["verdicts"]["baselines"].get(r["name"])}
        for r in rows:   # every weighted score with its stratified bootstrap interval
            dev_bits, test_bits = (dev_items, test_items) if r is rows[0] else pairs[r["name"]]
            r["dev_ci95"] = V.score_dict(r["dev"], dev_bits, scoring.weights(campaign), clusters=dev_clusters)["ci95"]
            r["test_ci95"] = V.score_dict(r["test"], test_bits, scoring.weights(campaign),
                                          clusters=test_clusters)["ci95"]
        _write_card(staging, campaign, study, chosen, rows, claims)
        replace_output(staging, out, overwrite=overwrite, protected=protected)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    record = {"trial": chosen.number, "out": str(out), "rows": rows, "time": time.time(),
              # each item's twin group, in the order of the rows' test items and of the trials'
              # dev items: the units of the verdicts, the dev comparisons and the gap
              "test_clusters": {d: list(v) for d, v in test_clusters.items()},
              "dev_clusters": {d: list(v) for d, v in dev_clusters.items()},
              "verdicts": claims["verdicts"], "generalization_gap": claims["generalization_gap"],
              "counts": claims["counts"], "selection_note": E.selection_note(claims["counts"]["trials_searched"],
                                                                            claims["counts"])}
    _record_export(directory, record, out)
    return ExportResult(out_dir=out, trial=chosen.number, dev_score=dev, test_score=test, rows=rows)


def _record_export(directory: Path, record: dict[str, Any], out: Path) -> None:
    """Append ``record`` to ``exports.json`` (replaced by rename). If the history cannot be read or
    written now, the record is saved beside it rather than lost, and the error says where."""
    path = directory / V.EXPORTS_FILE
    try:
        replace_text(path, json.dumps(V.export_history(directory) + [record], indent=2), root=directory)
    except (BrmergeError, OSError) as exc:
        aside = directory / f"exports.{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
        replace_text(aside, json.dumps([record], indent=2), root=directory)
        raise ExportError(f"the export to {out} is complete, but {path} could not be updated ({exc}); its record "
                          f"is in {aside}: add it to {path} by hand") from None


def _write_card(folder: Path, campaign: Campaign, study: optuna.Study, chosen: optuna.trial.FrozenTrial,
                rows: list[dict[str, Any]], claims: dict[str, Any]) -> None:
    from merge_core.provenance import PROVENANCE_FILE, escape_markdown, write_model_card

    prov = json.loads((folder / PROVENANCE_FILE).read_text())
    finished = len(T.finished_trials(study))
    search = {"campaign": campaign.name, "trial": chosen.number, "method": campaign.method,
              "sampler": campaign.sampler, "granularity": campaign.granularity,
              "budget_trials": campaign.trials, "trials_finished": finished,
              "objectives": dict(campaign.objectives), "eval_suite": campaign.suite,
              "eval_limit": campaign.limit, "scores": rows, "verdicts": claims["verdicts"],
              "generalization_gap": claims["generalization_gap"], "counts": claims["counts"]}
    prov.setdefault("extra", {})["search"] = search
    domains = [d for d in campaign.objectives]
    table = ["| model | dev score [95% CI] | test score [95% CI] | "
             + " | ".join(f"{d} dev / test acc [95% CI]" for d in domains) + " |", "| --- | --- | --- | " + " | ".join("---" for _ in domains) + " |"]
    for r in rows:
        cells = [escape_markdown(r["name"]), _score_cell(r["dev"], r.get("dev_ci95")),
                 _score_cell(r["test"], r.get("test_ci95"))]
        cells += [f"{_acc(r['dev_domains'].get(d))} / {_acc(r['test_domains'].get(d))}" for d in domains]
        table.append("| " + " | ".join(cells) + " |")
    split_note = ("the shipped sample suite" if campaign.suite == "sample"
                  else "the PT-BR exam suites")
    gap = rows[0]["test"] - rows[0]["dev"] if rows[0]["test"] is not None else None
    body = (f"Found by a brmerge search campaign `{campaign.name}`: {campaign.sampler} sampler over per-"
            f"{campaign.granularity} coefficients of `{campaign.method}`, {finished} of {campaign.trials} "
            f"trials, trial {chosen.number} selected on the dev split of {split_note}. Test scores are "
            "held-out items never used by the search. Baselines: the uniform merge (equal weights, "
            "default density) and each fine-tune alone. Accuracies carry 95% Wilson intervals.\n\n"
            + "\n".join(table)
            + "\n\n" + V.claims_markdown(claims, escape_markdown)
            + f"\n\nSelection: {E.selection_note(finished, claims['counts'])}."
            + (f" Dev score {rows[0]['dev']:.4f} -> test score {rows[0]['test']:.4f} "
               f"(gap {gap:+.4f})." if gap is not None else ""))
    write_model_card(folder, prov, extra_sections=[("Search and scores", body)])


def _acc(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "-"
    low, high = entry["ci95"]
    return f"{entry['acc']:.3f} [{low:.2f}, {high:.2f}]"


def _score_cell(value: float | None, ci: Sequence[float] | None) -> str:
    """A weighted score with its 95% interval (the card's score columns)."""
    if value is None:
        return "-"
    return f"{value:.4f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{value:.4f}"


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``n`` for the block (unchanged when ``n`` is None)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
