"""The resident evaluator: determinism, live reuse, the test-split guard, lm-eval parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks_ptbr.suite import load_suite
from evals.harness import Evaluator
from tests.evals.parity import check_parity, lm_eval_run


def _probs(result):
    return [i.gold_prob for i in result.items]


def test_result_shape_and_determinism(tiny_lm):
    model, tok = tiny_lm
    first = Evaluator.for_suite(tok, split="dev", source="sample", limit=5)
    second = Evaluator.for_suite(tok, split="dev", source="sample", limit=5)
    a, b = first.evaluate(model), second.evaluate(model)
    assert list(a.tasks) == ["ptbr_sample_legal_dev", "ptbr_sample_health_dev",
                             "ptbr_sample_enem_dev"]
    for name, m in a.tasks.items():
        assert m.n == 5 and 0.0 <= m.acc <= 1.0 and 0.0 < m.gold_prob < 1.0
        items = [i for i in a.items if i.task == name]
        assert m.acc == pytest.approx(sum(i.correct for i in items) / 5)
        assert m.gold_prob == pytest.approx(sum(i.gold_prob for i in items) / 5)
    assert [(i.task, i.id, i.pred) for i in a.items] == [(i.task, i.id, i.pred) for i in b.items]
    assert _probs(a) == _probs(b)
    assert all(i.correct == (i.pred == i.gold) for i in a.items)
    assert a.skipped["ptbr_sample_legal_dev"]["fewshot"] == 3


def test_reuse_after_in_place_weight_change(tiny_lm):
    model, tok = tiny_lm
    evaluator = Evaluator.for_suite(tok, split="dev", source="sample", limit=4)
    before = evaluator.evaluate(model)
    head = model.get_output_embeddings().weight
    saved = head.detach().clone()
    with torch.no_grad():
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)))
    try:
        changed = evaluator.evaluate(model)
        assert _probs(changed) != _probs(before)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert _probs(evaluator.evaluate(model)) == _probs(before)


def test_batching_and_prefix_sharing_do_not_change_scores(long_lm):
    model, tok = long_lm
    suite = load_suite(split="dev", source="sample", domains=["enem", "legal"], limit=6)
    shared = Evaluator(tok, suite)
    batched = shared.evaluate(model)
    groups = next(iter(shared._groups.values()))
    assert all(g.prefix is not None and g.prefix.shape[1] > 100 for g in groups)
    single = Evaluator(tok, suite, max_batch=1, share_prefix=False).evaluate(model)
    assert [i.pred for i in batched.items] == [i.pred for i in single.items]
    assert np.allclose(_probs(batched), _probs(single), atol=1e-5)


def test_search_evaluator_refuses_test_split(tiny_lm):
    _, tok = tiny_lm
    with pytest.raises(ValueError, match="refusing to score the test split for search"):
        Evaluator.for_suite(tok, split="test", source="sample")
    suite = load_suite(split="test", source="sample", domains=["legal"], limit=2)
    with pytest.raises(ValueError, match="allow_test=True"):
        Evaluator(tok, suite)
    assert Evaluator(tok, suite, allow_test=True).suite.split == "test"
    assert Evaluator(tok, suite, purpose="report").suite.split == "test"
    with pytest.raises(ValueError, match="purpose='tune'"):
        Evaluator(tok, suite, purpose="tune")


def test_accuracy_equals_lm_eval_on_sample(long_lm):
    model, tok = long_lm  # untruncated prompts: the shared-prefix path
    suite = load_suite(split="dev", source="sample", domains=["legal", "enem"], limit=4)
    ours = Evaluator(tok, suite).evaluate(model)
    check_parity(ours, lm_eval_run(model, tok, suite, metadata={}))


def test_accuracy_equals_lm_eval_on_shared_data(tiny_lm, data_dir):
    model, tok = tiny_lm  # 512-token window: prompts are left-truncated as lm-eval does
    suite = load_suite(split="test", source="data", data_dir=data_dir,
                       domains=["health", "healthbench"], limit=3)
    ours = Evaluator(tok, suite, purpose="report").evaluate(model)
    check_parity(ours, lm_eval_run(model, tok, suite, metadata={"data_dir": str(data_dir)}))


def test_letters_split_into_space_and_letter_tokens(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from search.demo.tiny import llama_config, make_llama, make_tokenizer

    # 259 = 256 byte tokens + 3 specials: no merges, so " A" is two tokens (" ", "A").
    make_tokenizer(tmp_path / "tok", vocab_size=259)
    config = llama_config(vocab_size=259)
    config.max_position_embeddings = 4096
    path = make_llama(tmp_path / "m", config=config, tokenizer_dir=tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert len(tok(" A", add_special_tokens=False)["input_ids"]) == 2
    suite = load_suite(split="dev", source="sample", domains=["legal"], limit=3)
    evaluator = Evaluator(tok, suite)
    space = tok(" ", add_special_tokens=False)["input_ids"]
    for request in evaluator.requests:
        assert list(request.prefix[-1:]) == space  # the shared " " moved into the prefix
        assert [tok.decode([t]) for t in request.letter_tokens] == ["A", "B", "C", "D"]
    shared = evaluator.evaluate(model)
    plain = Evaluator(tok, suite, share_prefix=False, max_batch=1).evaluate(model)
    assert [i.pred for i in shared.items] == [i.pred for i in plain.items]
    assert np.allclose(_probs(shared), _probs(plain), atol=1e-5)


@pytest.mark.gpu
def test_cuda_matches_cpu(long_lm):
    model, tok = long_lm
    suite = load_suite(split="dev", source="sample", limit=4)
    evaluator = Evaluator(tok, suite)
    cpu = evaluator.evaluate(model)
    try:
        cuda = evaluator.evaluate(model.to("cuda"))
    finally:
        model.to("cpu")
    assert [i.pred for i in cuda.items] == [i.pred for i in cpu.items]
    assert np.allclose(_probs(cuda), _probs(cpu), atol=1e-3)


def test_bfloat16_matches_stock_lm_eval_run_in_bfloat16(long_lm):
    from transformers import AutoModelForCausalLM

    model, tok = long_lm  # the shared-prefix path, in bf16 (lm-eval: --model_args dtype=bfloat16)
    path = model.config.name_or_path
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    suite = load_suite(split="dev", source="sample", domains=["legal", "enem"], limit=4)
    ours = Evaluator(tok, suite).evaluate(bf16)
    assert next(bf16.parameters()).dtype == torch.bfloat16
    check_parity(ours, lm_eval_run(path, tok, suite, metadata={}, dtype="bfloat16"))
