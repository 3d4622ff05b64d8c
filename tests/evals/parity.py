"""Run stock lm-eval on the items an Evaluator scored, and compare item by item."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from benchmarks_ptbr.lm_eval_tasks import TASKS_DIR
from benchmarks_ptbr.suite import load_suite


def lm_eval_run(model: Any, tok: Any, suite: Any, *, metadata: dict[str, Any],
                chat_template: bool = False, tasks_dir: Any = TASKS_DIR,
                batch_size: int = 4, dtype: str | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on the same items (``samples``), as the stock CLI runs
    ``--apply_chat_template --fewshot_as_multiturn`` when ``chat_template`` is set. With
    ``dtype``, ``model`` is a model folder that HFLM loads itself, as ``--model_args
    pretrained=FOLDER,dtype=DTYPE`` does."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # lm-eval scores the task's full item list; ``samples`` picks the evaluator's subset.
    full = load_suite(split=suite.split, source=suite.source, data_dir=suite.data_dir,
                      domains=[t.domain for t in suite.tasks])
    samples = {}
    for task in suite.tasks:
        ids = [i.id for i in full.task(task.name).items]
        samples[task.name] = [ids.index(i.id) for i in task.items]
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False, metadata=metadata)
    lm = (HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size) if dtype is None else
          HFLM(pretrained=str(model), tokenizer=tok, batch_size=batch_size, dtype=dtype, device="cpu"))
    return lm_eval.simple_evaluate(model=lm, tasks=list(samples), task_manager=tm,
                                   samples=samples, log_samples=True, verbosity="ERROR",
                                   apply_chat_template=chat_template,
                                   fewshot_as_multiturn=chat_template)


def check_parity(ours: Any, theirs: dict[str, Any], *, prob_tol: float = 1e-4) -> None:
    """Same accuracy, same prediction per item, same gold probability per item (within
    ``prob_tol``)."""
    for name, metrics in ours.tasks.items():
        assert theirs["results"][name]["acc,none"] == pytest.approx(metrics.acc)
        by_id = {i.id: i for i in ours.items if i.task == name}
        assert len(theirs["samples"][name]) == metrics.n
        for sample in theirs["samples"][name]:
            lls = np.array([float(r[0]) for r in sample["filtered_resps"]])
            mine = by_id[sample["doc"]["id"]]
            assert sample["doc"]["choices"][int(np.argmax(lls))] == mine.pred
            gold = sample["doc"]["choices"].index(sample["doc"]["answer"])
            probs = np.exp(lls - lls.max()) / np.exp(lls - lls.max()).sum()
            assert probs[gold] == pytest.approx(mine.gold_prob, abs=prob_tol)
