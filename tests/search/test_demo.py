"""``brmerge demo`` end to end with a small zoo and budget; every claim of its summary.json is
checked against the study it ran, the export's held-out test scores, and the evaluator itself."""

from __future__ import annotations

import json
import re
from pathlib import Path

import optuna
import pytest

from search import trials as T
from search.demo import facts as F
from search.demo.run import DATA_DIR, DOMAINS, MARKER, NUM_FEWSHOT, DemoError, run_demo
from search.demo.table import RIVALS
from search.demo.zoo import ZooRecipe
from search.storage import load_study
from search.trials import best_trials

TRIALS = 6  # CI budget: the claim is measured at the default budget by perf/demo_seeds.py
# a small zoo: few facts, short training (the default recipe takes a minute to train)
SMALL = ZooRecipe(facts=16, format_subjects=8, base_steps=20, specialist_steps=40)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo")
    directory = root / "campaign"
    lines: list[str] = []
    run_demo(directory=directory, trials=TRIALS, progress=False, cache_dir=root / "cache",
             zoo_recipe=SMALL, echo=lines.append)
    text = "\n".join(lines)
    assert "held-out test items" in text and "summary:" in text
    return directory, json.loads((directory / "summary.json").read_text())


pytestmark = pytest.mark.slow   # a whole demo (~15 s with the small zoo)


def _rows(summary: dict) -> dict[str, dict]:
    return {r["key"]: r for r in summary["rows"]}


def _same_domains(row: dict, trial: optuna.trial.FrozenTrial) -> None:
    stored = trial.user_attrs[T.A_DOMAINS]
    assert set(row["domains"]) == set(stored) == set(DOMAINS)
    for d in DOMAINS:
        for key in ("acc", "gold_prob", "n"):
            assert row["domains"][d][key] == stored[d][key], (row["name"], d, key)


def test_dev_and_test_ask_the_same_facts_in_other_words():
    facts, fmt = F.make_facts(facts=40, format_subjects=10, seed=3)
    for domain in DOMAINS:
        dev, test = F.rows(facts, "dev")[domain], F.rows(facts, "test")[domain]
        spec = F.DOMAIN_FACTS[domain]
        assert len(dev) == 40 * len(spec.dev) and len(test) == 40 * len(spec.test) == 40 * 2
        # no test phrasing is a dev phrasing, and none of the dev wording around the subject repeats
        assert not set(spec.dev) & set(spec.test)
        assert not {q["question"] for q in dev} & {q["question"] for q in test}
        # every test question asks a fact that dev asks too, with the same answer
        key = {f.subject: F.LABELS[f.answer] for f in facts[domain]}
        for row in test:
            subject = next(s for s in key if s in row["question"])
            assert row["answerKey"] == key[subject]
        # answers balanced over the four letters; format subjects are never facts
        assert sorted({r["answerKey"] for r in dev}) == list(F.LABELS)
        assert not set(fmt[domain]) & set(key)


def test_a_base_that_knows_facts_learns_fixed_answers_and_no_specialist_fact():
    import itertools
    import random

    from search.demo import zoo as Z

    def letters(recipe):
        seen: dict[str, set[str]] = {}
        weighted = []
        for ex in itertools.islice(Z.base_examples(recipe, random.Random(0)), 600):
            if "Resposta correta:" not in ex.text:
                continue
            subject = max((s for d in DOMAINS for s in fmt[d] if re.search(re.escape(s) + r"\b", ex.text)), key=len)
            letter = ex.text.rsplit("Resposta correta:", 1)[1].strip()[:1]
            seen.setdefault(subject, set()).add(letter)
            weighted.append(bool(ex.answers))
        return seen, weighted

    recipe = ZooRecipe(facts=16, format_subjects=8, base_facts_weight=40.0)
    facts, fmt = recipe.make_facts()
    seen, weighted = letters(recipe)
    assert all(weighted) and all(len(v) == 1 for v in seen.values()) and len(seen) == 16
    assert {s: v.pop() for s, v in seen.items()} == {
        s: F.LABELS[a] for d in DOMAINS for s, a in Z.base_facts(recipe)[d].items()}
    # the specialists' facts never appear in the base's texts
    texts = " ".join(ex.text for ex in itertools.islice(Z.base_examples(recipe, random.Random(1)), 600))
    assert not any(re.search(re.escape(f.subject) + r"\b", texts) for d in DOMAINS for f in facts[d])
    # base_facts_weight 0: random letters, not weighted (the format only)
    seen, weighted = letters(ZooRecipe(facts=16, format_subjects=8, base_facts_weight=0.0))
    assert not any(weighted) and any(len(v) > 1 for v in seen.values())


def test_the_demo_items_load_into_the_right_splits(tmp_path):
    from benchmarks_ptbr.sources import load_data_dir

    facts, _ = F.make_facts(facts=12, format_subjects=2, seed=1)
    F.write_data_dir(facts, tmp_path)
    for domain in DOMAINS:
        loaded = load_data_dir(domain, tmp_path)
        for split in ("dev", "test"):
            assert [i.id for i in loaded.items[split]] == [r["id"] for r in F.rows(facts, split)[domain]]
            assert not sum(loaded.skipped[split].values())
            # a fact's wordings share one twin group (the verdicts count the fact once)
            assert [i.pair for i in loaded.items[split]] == [
                f"demo-{domain}-{f.index:04d}" for f in facts[domain] for _ in F.DOMAIN_FACTS[domain].test]


def test_shuffled_options_keep_each_answer_on_its_value():
    """``shuffle_options``: each question lists the four values in an order of its own, and the
    answer letter follows the fact's value; without it the order is fixed."""
    for shuffled in (False, True):
        facts, _ = F.make_facts(facts=20, format_subjects=2, seed=4, shuffled=shuffled)
        orders = set()
        for domain in DOMAINS:
            values = {f.subject: f.value for f in facts[domain]}
            for split in ("dev", "test"):
                for row in F.rows(facts, split)[domain]:
                    subject = next(s for s in values if s in row["question"])
                    texts = {c["label"]: c["text"] for c in row["choices"]}
                    assert texts[row["answerKey"]] == values[subject]
                    assert sorted(texts.values()) == sorted(F.DOMAIN_FACTS[domain].values)
                    orders.add(tuple(c["text"] for c in row["choices"]))
        assert (len(orders) > 2) == shuffled     # fixed: one order per domain


def test_disjoint_names_draw_each_domain_from_its_own_syllables():
    def pattern(onsets):
        syllable = "(?:" + "|".join(sorted(onsets, key=len, reverse=True)) + ")[aeiou][nrsl]?"
        return re.compile(f"(?:{syllable}){{2,3}}")

    def names(facts, fmt, domain):
        prefix = F.DOMAIN_FACTS[domain].subject.split("{}")[0]
        return [s[len(prefix):].lower() for s in [f.subject for f in facts[domain]] + fmt[domain]]

    facts, fmt = F.make_facts(facts=30, format_subjects=10, seed=2, disjoint=True)
    legal, health = names(facts, fmt, "legal"), names(facts, fmt, "health")
    own = {"legal": pattern(F._ONSETS), "health": pattern(F._ONSETS_B)}
    assert all(own["legal"].fullmatch(n) for n in legal) and all(own["health"].fullmatch(n) for n in health)
    assert not any(own["health"].fullmatch(n) for n in legal)
    assert not any(own["legal"].fullmatch(n) for n in health)
    facts, fmt = F.make_facts(facts=30, format_subjects=10, seed=2)   # by default one inventory for both
    assert all(own["legal"].fullmatch(n) for d in DOMAINS for n in names(facts, fmt, d))


def test_replay_mixes_the_bases_own_facts_into_a_specialists_texts():
    import itertools
    import random

    from search.demo import zoo as Z

    recipe = ZooRecipe(facts=16, format_subjects=8, replay_fraction=0.5)
    facts, fmt = recipe.make_facts()
    answers = Z.base_facts(recipe)
    examples = list(itertools.islice(Z.specialist_examples(recipe, "legal", random.Random(0)), 400))
    fmt_subjects = {s: (d, a) for d in DOMAINS for s, a in answers[d].items()}
    replayed = [e for e in examples if any(re.search(re.escape(s) + r"\b", e.text) for s in fmt_subjects)]
    assert 0.4 < len(replayed) / len(examples) < 0.6
    assert {d for e in replayed for s, (d, _) in fmt_subjects.items() if s in e.text} == set(DOMAINS)
    for e in replayed:     # the base's answer, weighted
        if e.answers:
            subject = max((s for s in fmt_subjects if re.search(re.escape(s) + r"\b", e.text)), key=len)
            _, a = fmt_subjects[subject]
            assert e.text[e.answers[0]] == F.LABELS[a]
    none = list(itertools.islice(Z.specialist_examples(ZooRecipe(facts=16, format_subjects=8), "legal",
                                                       random.Random(0)), 200))
    assert not any(s in e.text for e in none for s in fmt_subjects)


def test_health_lr_ratio_scales_only_the_health_specialists_learning_rate():
    recipe = ZooRecipe(specialist_lr=5e-4, health_lr_ratio=0.4)
    assert (recipe.specialist_lr_of("legal"), recipe.specialist_lr_of("health")) == pytest.approx((5e-4, 2e-4))
    assert ZooRecipe().specialist_lr_of("health") == ZooRecipe().specialist_lr
    assert ZooRecipe(health_lr_ratio=0.4).digest() != ZooRecipe().digest()


def test_trial_count_rows_and_counts(demo_run):
    directory, summary = demo_run
    study = load_study(directory)
    assert summary["trials"] == len(T.finished_trials(study)) == summary["budget_trials"] == TRIALS
    assert [r["key"] for r in summary["rows"]] == ["base", "legal", "health", "uniform", "best"]
    c = summary["counts"]
    assert c["trials_searched"] == TRIALS and 1 <= c["distinct_candidates"] <= TRIALS
    assert c["exports"] == 1 and c["test_looks"] == 1
    assert summary["wall_seconds"] > 0 and "synthetic" in summary["note"]


def test_uniform_row_is_the_uniform_baseline_trial_queued_first(demo_run):
    directory, summary = demo_run
    study = load_study(directory)
    row = _rows(summary)["uniform"]
    trial = study.trials[row["trial"]]
    assert trial.number == 0 and trial.user_attrs[T.A_BASELINE] == "uniform"
    assert row["combined"] == trial.value == trial.user_attrs[T.A_SCORE]
    _same_domains(row, trial)


def test_best_row_is_the_studys_best_trial(demo_run):
    directory, summary = demo_run
    study = load_study(directory)
    row = _rows(summary)["best"]
    best = best_trials(study, 1)[0]
    assert row["trial"] == best.number and row["combined"] == study.best_value == best.value
    assert row["baseline"] == best.user_attrs.get(T.A_BASELINE)
    _same_domains(row, best)


def test_source_rows_are_the_evaluators_scores_on_the_demo_items(demo_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.fitness import weighted_score
    from evals.harness import Evaluator

    directory, summary = demo_run
    rows = _rows(summary)
    tokenizer = AutoTokenizer.from_pretrained(rows["base"]["model"])
    evaluator = Evaluator.for_suite(tokenizer, split="dev", source="data", data_dir=directory / DATA_DIR,
                                    domains=list(DOMAINS), num_fewshot=NUM_FEWSHOT)
    for key in ("base", *DOMAINS):
        row = rows[key]
        model = AutoModelForCausalLM.from_pretrained(row["model"], dtype=torch.float32).eval()
        result = evaluator.evaluate(model)
        assert row["combined"] == weighted_score(result, weights={d: 1.0 for d in DOMAINS})
        for m in result.tasks.values():
            assert m.n == SMALL.facts * len(F.DOMAIN_FACTS[m.domain].dev)
            assert (row["domains"][m.domain]["acc"], row["domains"][m.domain]["gold_prob"]) == (m.acc, m.gold_prob)


def test_verdicts_are_the_held_out_test_comparisons(demo_run):
    from evals.stats import decode_bits
    from search import verdicts as V

    directory, summary = demo_run
    verdict = summary["claim"]
    record = json.loads((directory / "exports.json").read_text())[-1]
    assert verdict["split"] == "test" and verdict["test_items"] == sum(
        SMALL.facts * len(F.DOMAIN_FACTS[d].test) for d in DOMAINS)
    # recomputed here from the export's per-item test results: the same p-values, Holm and all
    bits = {r["name"]: {d: decode_bits(s) for d, s in r["test_items"].items()} for r in record["rows"]}
    exported = record["rows"][0]["name"]
    again = V.held_out_verdicts(bits[exported], {k: v for k, v in bits.items() if k != exported}, None,
                                clusters=record["test_clusters"])
    # the two test wordings of a fact are one twin group: the tests count each fact once
    assert verdict["test_units"] == again["n_units"] == SMALL.facts * len(DOMAINS)
    assert all(len(set(g)) == SMALL.facts for g in record["test_clusters"].values())
    # the dev items too (two dev wordings a fact): the dev comparisons and the gap count facts
    assert all(len(set(g)) == SMALL.facts and len(g) == 2 * SMALL.facts for g in record["dev_clusters"].values())
    assert all(d is None or d["units"] == SMALL.facts * len(DOMAINS) for d in verdict["dev_selected_on"].values())
    assert set(verdict["test"]) == set(RIVALS)
    assert sorted(r["p_holm"] for r in verdict["test"].values()) == pytest.approx(
        sorted(r["p_holm"] for r in again["baselines"].values()))
    assert verdict["beats_all"]["p_value"] == pytest.approx(again["beats_all"]["p_value"])
    assert verdict["best_beats_specialists_and_uniform_on_test"] == (
        verdict["best_is_searched"] and again["beats_all"]["holds"]
        and all(r["verdict"] == "better" for r in again["baselines"].values()))
    # dev comparisons carry numbers and no verdict word
    assert all(d is None or d["verdict"] is None for d in verdict["dev_selected_on"].values())
    assert all("no verdict" in d["text"] for d in verdict["dev_selected_on"].values() if d)


def test_test_scores_in_the_rows_are_the_exports(demo_run):
    directory, summary = demo_run
    rows = _rows(summary)
    record = json.loads((directory / "exports.json").read_text())[-1]
    assert rows["best"]["test_combined"] == record["rows"][0]["test"]
    uniform = next(r for r in record["rows"] if r["name"] == "uniform")
    assert rows["uniform"]["test_combined"] == uniform["test"]
    for d in DOMAINS:
        e = rows["best"]["test"][d]
        assert e["n"] == SMALL.facts * len(F.DOMAIN_FACTS[d].test) and e["ci95"][0] <= e["acc"] <= e["ci95"][1]


def test_report_and_export_with_card(demo_run):
    directory, summary = demo_run
    export = Path(summary["export"])
    card = (export / "README.md").read_text()
    assert "Search and scores" in card and (export / "model.safetensors").is_file()
    # the card's verdicts come from the held-out test items (weighted score, sign-flip, Holm)
    assert "sign-flip" in card and "Holm" in card and "held-out test items" in card
    history = json.loads((directory / "exports.json").read_text())
    assert history[-1]["trial"] == _rows(summary)["best"]["trial"]
    assert Path(summary["report"]).is_file() and (directory / "report" / "history.png").is_file()


def test_a_directory_not_made_by_the_demo_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DemoError, match="not empty"):
        run_demo(directory=tmp_path, trials=TRIALS, progress=False, echo=lambda m: None)
    assert (tmp_path / "precious.txt").read_text() == "keep me" and not (tmp_path / MARKER).exists()


def test_too_small_a_budget_is_refused(tmp_path):
    with pytest.raises(DemoError, match="--trials 3"):
        run_demo(directory=tmp_path / "d", trials=3, progress=False, echo=lambda m: None)


def test_specialists_trained_in_parallel_are_the_sequential_ones_bit_for_bit(tmp_path):
    """The zoo trains both specialists at once in two spawned processes: each starts from the
    saved base with its own seeds, so the weights match a one-process build exactly."""
    import torch
    from safetensors.torch import load_file

    from search.demo.zoo import MODEL_NAMES, build_zoo

    recipe = ZooRecipe(facts=8, format_subjects=4, base_steps=4, specialist_steps=6)
    one, two = tmp_path / "sequential", tmp_path / "parallel"
    for folder, parallel in ((one, False), (two, True)):
        folder.mkdir()
        losses = build_zoo(recipe, folder, progress=False, log=lambda m: None, parallel=parallel)
        assert set(losses) == {"base", "legal", "health"}
    for name in MODEL_NAMES.values():
        a = load_file(str(one / name / "model.safetensors"))
        b = load_file(str(two / name / "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    base = load_file(str(one / MODEL_NAMES["base"] / "model.safetensors"))
    legal = load_file(str(one / MODEL_NAMES["legal"] / "model.safetensors"))
    assert any(not torch.equal(base[k], legal[k]) for k in base)   # the fine-tune did change it


def test_a_failing_specialist_process_is_one_error_naming_it(tmp_path):
    from search.demo.zoo import build_zoo

    recipe = ZooRecipe(facts=8, format_subjects=4, base_steps=2, specialist_steps=2, specialist_lr=float("nan"))
    with pytest.raises(RuntimeError, match="specialist"):
        build_zoo(recipe, tmp_path, progress=False, log=lambda m: None, parallel=True)


def test_a_script_training_a_zoo_without_a_main_guard_fails_fast_with_the_fix(tmp_path):
    """The specialists train in spawned children, which re-import the calling script: a script
    that trains a zoo at import time must stop in the child at once, before training a base of
    its own, with the fix in the message, and leave no zoo (complete-looking or staged)."""
    import subprocess
    import sys

    script = tmp_path / "unguarded.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from search.demo.zoo import ZooRecipe, ensure_zoo\n"
        "print('script body ran', file=sys.stderr, flush=True)\n"
        "recipe = ZooRecipe(hidden=16, layers=1, heads=2, intermediate=32, vocab_size=300,\n"
        "                   facts=4, format_subjects=4, base_steps=2, specialist_steps=2)\n"
        f"ensure_zoo(recipe, cache_dir={str(tmp_path / 'cache')!r}, progress=False)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0
    assert done.stderr.count("script body ran") == 3           # the script, then each child re-importing it
    child_errors = [line for line in done.stderr.splitlines() if line.startswith("RuntimeError: a script")]
    assert len(child_errors) == 2 and 'if __name__ == "__main__":' in child_errors[0]
    assert "specialist's training process exited with code 1 before it reported" in done.stderr
    # the parent saved its base (transformers' "Writing model shards" bar); the children saved nothing
    assert done.stderr.count("Writing model shards: 100%") == 1
    assert not list((tmp_path / "cache" / "zoo").iterdir())    # no zoo, no staging folder


def test_the_base_trains_on_base_threads_and_the_specialists_on_threads(tmp_path, monkeypatch):
    """The base trains alone, on ``base_threads``; each specialist on ``threads``; the caller's
    thread count is back afterwards."""
    import torch

    from search.demo import zoo as Z

    seen: list[tuple[float, int]] = []
    real = Z.train

    def spy(model, tokenizer, examples, **kwargs):
        seen.append((kwargs.get("lr"), torch.get_num_threads()))
        return real(model, tokenizer, examples, **kwargs)

    monkeypatch.setattr(Z, "train", spy)
    before = torch.get_num_threads()
    recipe = ZooRecipe(facts=8, format_subjects=4, base_steps=2, specialist_steps=2, base_lr=1e-3,
                       specialist_lr=5e-4, base_threads=2, threads=1)
    Z.build_zoo(recipe, tmp_path, progress=False, log=lambda m: None, parallel=False)
    assert seen == [(1e-3, 2), (5e-4, 1), (5e-4, 1)]
    assert torch.get_num_threads() == before
    assert ZooRecipe(base_threads=1).digest() != ZooRecipe().digest()
