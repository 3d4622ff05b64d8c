"""Campaign -> how a candidate is scored: the evaluators and the score formula.

The worker (every trial) and ``export`` (the proof that an exported model is the searched one,
then its held-out test scores) build their evaluators here: the export's bit-identity check
holds only because both run exactly this code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from search.campaign import Campaign


def scored_domains(campaign: Campaign) -> list[str]:
    """Domains a trial scores: those with a positive weight (every objective with nsga2)."""
    if campaign.multi_objective:
        return list(campaign.objectives)
    return [d for d, w in campaign.objectives.items() if w > 0]


def weights(campaign: Campaign) -> dict[str, float]:
    return {d: w for d, w in campaign.objectives.items() if w > 0}


def evaluator(campaign: Campaign, tokenizer: Any, *, split: str = "dev", limit: int | None | str = "campaign",
              purpose: str = "search"):
    """The evaluator of ``split`` with the campaign's suite, data, shots and (by default) limit.

    The campaign's own dev evaluator of a staged campaign batches stage 1's items apart
    (``first``): stage 2 then scores only the rest, and a trial's final score is bit-identical
    to this evaluator's whole evaluation (what ``export`` re-scores)."""
    from evals.harness import Evaluator

    source = "sample" if campaign.suite == "sample" else "data"
    first: list[tuple[str, str]] = []
    if limit == "campaign" and split == search_split(campaign) and staged(campaign):
        first = evaluator(campaign, tokenizer, split=split, limit=campaign.stage1, purpose=purpose).keys()
    return Evaluator.for_suite(tokenizer, split=split, source=source, data_dir=campaign.data_dir,
                               domains=scored_domains(campaign), num_fewshot=campaign.num_fewshot,
                               limit=campaign.limit if limit == "campaign" else limit, purpose=purpose,
                               allow_test=campaign.allow_test, chat_template=campaign.chat_template,
                               batch_tokens=campaign.max_batch_tokens, first=first)


def staged(campaign: Campaign) -> bool:
    """Whether trials are scored in two stages (a stage-1 subset first)."""
    return bool(campaign.stage1) and not campaign.multi_objective


def search_split(campaign: Campaign) -> str:
    return "test" if campaign.suite == "test" else "dev"


def stage_evaluators(campaign: Campaign, tokenizer: Any):
    """(full, stage-1 or None) evaluators of a search worker."""
    split = search_split(campaign)
    full = evaluator(campaign, tokenizer, split=split)
    return full, (evaluator(campaign, tokenizer, split=split, limit=campaign.stage1) if staged(campaign) else None)


def stage1_in_full(full: Any, stage1: Any) -> bool:
    """Whether every stage-1 request is one of ``full``'s ``first`` part, token for token: then
    stage 1 is scored as that part of ``full`` and stage 2 scores only the rest."""
    mine = {(r.task, r.item_id): r for r in full.requests}
    first = set(full.keys("first"))
    return all((r.task, r.item_id) in first and mine[(r.task, r.item_id)] == r for r in stage1.requests)


def score(campaign: Campaign, result: Any) -> float:
    """The campaign's scalar objective of one evaluation result."""
    from evals.fitness import weighted_score

    return weighted_score(result, weights=weights(campaign))


def objectives(campaign: Campaign, result: Any) -> tuple[float, ...]:
    from evals.fitness import objective_vector

    return tuple(objective_vector(result, domains=list(campaign.objectives)))


def per_item(result: Any) -> tuple[dict[str, tuple[bool, ...]], dict[str, tuple[str, ...]]]:
    """({domain: correctness of each item}, {domain: item ids}), in the evaluator's order."""
    correct: dict[str, list[bool]] = {}
    ids: dict[str, list[str]] = {}
    for item in result.items:
        domain = result.tasks[item.task].domain
        correct.setdefault(domain, []).append(bool(item.correct))
        ids.setdefault(domain, []).append(str(item.id))
    return ({d: tuple(v) for d, v in correct.items()}, {d: tuple(v) for d, v in ids.items()})


def item_clusters(evaluator: Any, result: Any) -> dict[str, tuple[str, ...]]:
    """{domain: each item's twin group (the data's ``pair_id``; "" when it stands alone)}, in
    :func:`per_item`'s order: items of one group are not independent evidence, and the
    held-out tests count each group once (``evals.weighted_stats``, clusters)."""
    return groups_of(pair_lookup(evaluator), result)


def pair_lookup(*evaluators: Any) -> dict[tuple[str, str], str]:
    """{(task, item id): twin group} of every item the evaluators' suites hold (built once by a
    worker, which then reads each result's groups with :func:`groups_of`)."""
    return {(t.name, i.id): i.pair for ev in evaluators for t in ev.suite.tasks for i in t.items}


def groups_of(pairs: Mapping[tuple[str, str], str], result: Any) -> dict[str, tuple[str, ...]]:
    """:func:`item_clusters` of ``result`` from a :func:`pair_lookup`."""
    out: dict[str, list[str]] = {}
    for item in result.items:
        domain = result.tasks[item.task].domain
        out.setdefault(domain, []).append(pairs.get((item.task, str(item.id)), ""))
    return {d: tuple(v) for d, v in out.items()}


def domain_metrics(result: Any) -> dict[str, dict[str, float]]:
    return {m.domain: {"acc": m.acc, "gold_prob": m.gold_prob, "n": m.n} for m in result.tasks.values()}

