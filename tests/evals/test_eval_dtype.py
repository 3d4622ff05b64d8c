"""``brmerge eval --dtype`` and ``--max-batch-tokens``."""

from __future__ import annotations

import pytest
import torch

from evals import run as eval_run
from search.cli import main


def test_dtype_and_batch_budget_reach_the_model_and_the_stock_command(tiny_zoo, capsys, monkeypatch):
    monkeypatch.delenv("BRMERGE_DATA_DIR", raising=False)
    seen = {}
    load = eval_run.load_model

    def spy(model_id, **kw):
        seen["model"] = model = load(model_id, **kw)
        return model

    monkeypatch.setattr(eval_run, "load_model", spy)
    code = main(["eval", str(tiny_zoo["base"]), "--suite", "sample", "--tasks", "legal", "--limit", "2",
                 "--device", "cpu", "--dtype", "bfloat16", "--max-batch-tokens", "100000"])
    assert code == 0
    assert next(seen["model"].parameters()).dtype == torch.bfloat16
    assert "dtype=bfloat16" in capsys.readouterr().out           # lm_eval --model_args ...,dtype=bfloat16
    assert main(["eval", str(tiny_zoo["base"]), "--suite", "sample", "--tasks", "legal", "--limit", "2",
                 "--device", "cpu", "--max-batch-tokens", "10"]) == 2   # one prompt needs more: exit 2
    assert "raise max_batch_tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tiny_zoo["base"]), "--dtype", "fp8"])
