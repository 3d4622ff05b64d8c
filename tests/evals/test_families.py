"""Every model family the merge core takes, against stock lm-eval item by item.

Sliding-window and hybrid caches (Mistral, Gemma 2 and 3, Qwen2 with windows) share the
task prefix when the window covers the whole prompt and fall back to full sequences by
themselves when it does not; either way the scores are lm-eval's. Tokenizers are Mistral's
real SentencePiece and Tekken files from mistral-common, which add a BOS token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks_ptbr.suite import load_suite
from evals import kv
from evals.harness import Evaluator
from tests.evals.parity import check_parity, lm_eval_run

V1, V3, V7 = ("tokenizer.model.v1", "mistral_instruct_tokenizer_240323.model.v3",
              "mistral_instruct_tokenizer_241114.model.v7")
TEKKEN = "tekken_240911.json"


def _model(family: str, window: int, vocab: int) -> torch.nn.Module:
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  bos_token_id=1, eos_token_id=2)
    configs = {
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(sliding_window=window, **common)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(sliding_window=window, head_dim=8,
                                                               **common)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(sliding_window=window,
                                                                   head_dim=8, **common)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
            use_sliding_window=True, sliding_window=window, max_window_layers=2, **common)),
    }
    torch.manual_seed(0)
    return configs[family]().eval()


# (family, window, tokenizer, shares the prefix): a window of 4096 covers the prompts (about
# 500-1500 tokens), so the cached prefix is exact; 64 does not, so full sequences run.
CASES = [("mistral", 4096, V3, True), ("mistral", 64, V1, False), ("gemma2", 4096, V7, True),
         ("gemma2", 64, V3, False), ("gemma3", 4096, V3, True), ("qwen2", 64, V7, False),
         ("mistral", 4096, TEKKEN, True)]


@pytest.mark.parametrize(("family", "window", "tok_file", "shares"), CASES,
                         ids=[f"{c[0]}-w{c[1]}-{c[2].split('.')[-1]}" for c in CASES])
def test_family_matches_lm_eval_item_by_item(mistral_tokenizer, family, window, tok_file, shares):
    tok = mistral_tokenizer(tok_file)
    model = _model(family, window, len(tok))
    assert kv.attention_window(model) == window
    suite = load_suite(split="dev", source="sample", domains=["legal", "enem"], limit=3)
    evaluator = Evaluator(tok, suite)
    ours = evaluator.evaluate(model)  # never "does not return a plain KV cache"
    assert set(evaluator.shared_prefix.values()) == {shares}
    plain = Evaluator(tok, suite, share_prefix=False, max_batch=1).evaluate(model)
    assert [i.pred for i in ours.items] == [i.pred for i in plain.items]
    assert np.allclose([i.gold_prob for i in ours.items], [i.gold_prob for i in plain.items],
                       atol=1e-5)
    check_parity(ours, lm_eval_run(model, tok, suite, metadata={}))


def test_bos_is_added_as_the_stock_harness_adds_it(mistral_tokenizer):
    # lm-eval up to 0.4.9.1 encoded without the tokenizer's BOS; from 0.4.9.2 HFLM keeps the
    # tokenizer's default, and so do we (pyproject pins lm-eval>=0.4.9.2).
    from lm_eval.models.huggingface import HFLM

    tok = mistral_tokenizer(V3)
    model = _model("mistral", 4096, len(tok))
    suite = load_suite(split="dev", source="sample", domains=["legal"], limit=2)
    evaluator = Evaluator(tok, suite)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1)
    for request, item in zip(evaluator.requests, suite.tasks[0].items):
        assert request.prefix[0] == tok.bos_token_id
        context = suite.tasks[0].context(item)
        stock_context, stock_letter = lm._encode_pair(context, " " + item.labels[0])
        assert tuple(stock_context) + tuple(stock_letter[:-1]) == request.prefix
        assert stock_letter[-1] == request.letter_tokens[0]


def test_kv_helpers_pin_the_cache_contract():
    # The only transformers cache API brmerge uses: a forward returns a cache; deepcopy and
    # batch_repeat_interleave widen it; the forward on top of it equals the full forward.
    model = _model("gemma2", 4096, 128)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # as the evaluator runs it
        cache = kv.prefix_cache(model, ids[:, :8])
        assert cache is not None and cache.get_seq_length() == 8
        wide = kv.widen(cache, 3)
        assert cache.get_seq_length() == 8
        tail = ids[:, 8:].expand(3, -1)
        out = model(input_ids=tail, attention_mask=torch.ones(3, 12, dtype=torch.long),
                    position_ids=torch.arange(8, 12).expand(3, -1), cache=wide, use_cache=True)
        full = model(input_ids=ids).logits
    assert torch.allclose(out.logits[0, -1], full[0, -1], atol=1e-5)
    assert torch.equal(out.logits[0], out.logits[2])
    assert kv.can_share_prefix(model, 4095) and not kv.can_share_prefix(model, 4096)
