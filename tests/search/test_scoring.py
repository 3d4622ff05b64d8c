"""Campaign -> evaluator: the one set-up the worker and the export share."""

from __future__ import annotations

import pytest

from merge_core.errors import BrmergeError
from search import scoring
from search.campaign import parse_campaign


def _campaign(**ev):
    return parse_campaign({"name": "c", "base_model": "b", "models": ["x", "y"], "method": "ties",
                           "objectives": {"legal": 1.0, "health": 0.0},
                           "eval": {"suite": "sample", "limit": 8, "stage1": False, **ev}})


def test_the_campaign_chooses_split_domains_limit_and_chat_template(tiny_zoo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_zoo["tokenizer"]))
    full, stage1 = scoring.stage_evaluators(_campaign(), tok)
    assert stage1 is None and full.suite.split == "dev"
    assert {t.domain for t in full.suite.tasks} == {"legal"}   # zero weight: not scored
    # the tiny tokenizer has no chat template: asking for one is a one-line user error
    with pytest.raises(BrmergeError, match="chat template"):
        scoring.evaluator(_campaign(chat_template=True), tok)
