"""The evaluator's memory bound (max_batch_tokens) and its scoring by parts (stage 1 / rest)."""

from __future__ import annotations

import pytest
import torch

from benchmarks_ptbr.suite import load_suite
from evals.harness import EvalError, Evaluator, batch_memory_tokens, rows_within


def test_the_rule_counts_the_widened_prefix_per_row():
    assert batch_memory_tokens(4, 100, 20) == 100 + 4 * 120    # one-row prefix + widened rows
    assert batch_memory_tokens(4, 0, 20) == 80                 # unshared: rows x whole prompt
    assert rows_within(580, 100, 20, max_rows=32) == 4
    assert rows_within(579, 100, 20, max_rows=32) == 3
    assert rows_within(219, 100, 20, max_rows=32) == 0
    assert rows_within(10**9, 100, 20, max_rows=32) == 32


def _batches(evaluator, model):
    groups = evaluator._groups_for(model, torch.device("cpu"))
    for g in groups:
        prefix = 0 if g.prefix is None else g.prefix.shape[1]
        for b in g.batches:
            yield g, prefix, b


def test_batches_stay_within_the_budget_and_score_the_same(long_lm):
    model, tok = long_lm
    suite = load_suite(split="dev", source="sample", domains=["enem", "legal"], limit=6)
    roomy = Evaluator(tok, suite)
    ref = roomy.evaluate(model)
    widest = max(batch_memory_tokens(1, p, b.input_ids.shape[1]) for _, p, b in _batches(roomy, model))
    budget = 2 * widest + 10          # room for about two rows of the widest batch
    tight = Evaluator(tok, suite, batch_tokens=budget)
    got = tight.evaluate(model)
    seen = list(_batches(tight, model))
    assert all(p > 100 for _, p, _ in seen)                    # the shared-prefix path is the one bounded
    for _, p, b in seen:
        rows, row_len = b.input_ids.shape
        assert batch_memory_tokens(rows, p, row_len) <= budget
        assert b.attention_mask.shape == (rows, p + row_len)
    assert max(b.input_ids.shape[0] for _, _, b in seen) >= 2  # batching still happens
    assert len(seen) > len(list(_batches(roomy, model)))
    assert [i.pred for i in got.items] == [i.pred for i in ref.items]
    assert [i.gold_prob for i in got.items] == pytest.approx([i.gold_prob for i in ref.items], abs=1e-5)


def test_a_prompt_that_alone_exceeds_the_budget_is_refused_naming_the_fix(long_lm):
    model, tok = long_lm
    suite = load_suite(split="dev", source="sample", domains=["legal"], limit=2)
    with pytest.raises(EvalError, match="raise max_batch_tokens to at least"):
        Evaluator(tok, suite, batch_tokens=50).evaluate(model)


def test_parts_score_exactly_what_the_whole_evaluation_scores(long_lm):
    model, tok = long_lm
    suite = load_suite(split="dev", source="sample", domains=["enem", "legal"], limit=6)
    first = Evaluator(tok, load_suite(split="dev", source="sample", domains=["enem", "legal"],
                                      limit=2)).keys()
    ev = Evaluator(tok, suite, first=first, max_batch=3)
    assert ev.keys("first") == first and len(ev.keys("rest")) == len(ev.requests) - len(first)
    whole = ev.evaluate(model)
    a, b = ev.scores(model, part="first"), ev.scores(model, part="rest")
    assert set(a).isdisjoint(b) and len(a) + len(b) == len(ev.requests)
    combined = ev.result_of({**a, **b})
    assert combined.items == whole.items                       # bit-identical, item by item
    assert combined.tasks == whole.tasks
    part = ev.result_of(a)
    assert [(i.task, i.id) for i in part.items] == first
    with pytest.raises(EvalError, match="part="):
        ev.scores(model, part="second")


def test_the_caches_a_forward_actually_holds_stay_within_the_budget(long_lm, monkeypatch):
    from evals import kv

    model, tok = long_lm
    suite = load_suite(split="dev", source="sample", domains=["legal"], limit=6)
    prefix_len = Evaluator(tok, suite)._groups_for(model, torch.device("cpu"))[0].prefix.shape[1]
    budget = prefix_len + 3 * (prefix_len + 200)       # about three rows per batch
    held, prefixes = [], []
    widen, prefix_cache = kv.widen, kv.prefix_cache
    monkeypatch.setattr(kv, "widen", lambda cache, rows: held.append(widen(cache, rows)) or held[-1])
    monkeypatch.setattr(kv, "prefix_cache", lambda *a, **k: prefixes.append(prefix_cache(*a, **k)) or prefixes[-1])
    Evaluator(tok, suite, batch_tokens=budget).evaluate(model)
    assert len(prefixes) == 1 and len(held) >= 2
    one = _tokens(prefixes[0])
    assert one == prefix_len
    for cache in held:    # after its forward: the widened prefix plus the rows' own tokens
        assert cache.get_seq_length() > prefix_len and one + _tokens(cache) <= budget


def _tokens(cache) -> int:
    """Rows x positions of the keys a cache holds (the same in every layer: checked)."""
    counts = {layer.keys.shape[0] * layer.keys.shape[-2] for layer in cache.layers}  # [B, H, S, D]
    assert len(counts) == 1
    return counts.pop()
