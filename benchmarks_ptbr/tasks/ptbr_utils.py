"""lm-eval glue for the PT-BR tasks (loaded by lm-eval through ``!function ptbr_utils.*``).

The items, shots and prompts come from the ``benchmarks_ptbr`` package, so stock
``lm_eval --include_path`` and brmerge's resident evaluator score the same strings.
The data directory of the non-sample tasks is, in this order: lm-eval metadata
``data_dir`` (``--metadata '{"data_dir": "/abs/path"}'``), then ``$BRMERGE_DATA_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

try:
    import benchmarks_ptbr  # noqa: F401
except ImportError:
    # lm-eval imports this file by path; when brmerge is not pip-installed, the package is
    # the folder two levels up (benchmarks_ptbr/tasks/ptbr_utils.py), whatever the cwd.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks_ptbr.extract import extract_letter  # noqa: E402
from benchmarks_ptbr.fewshot import DEFAULT_NUM_FEWSHOT  # noqa: E402
from benchmarks_ptbr.prompts import format_query  # noqa: E402
from benchmarks_ptbr.suite import load_suite  # noqa: E402


def _doc(item: Any, domain: str) -> dict[str, Any]:
    return {"id": item.id, "exam": item.exam, "query": format_query(item, domain),
            "choices": list(item.labels), "answer": item.answer}


def load_task(*, domain: str, split: str, source: str = "data", data_dir: str | None = None,
              num_fewshot: int = DEFAULT_NUM_FEWSHOT, **_metadata: Any):
    """``custom_dataset`` for every PT-BR task: a ``test`` split to score, a ``fewshot`` split."""
    import datasets

    suite = load_suite(split=split, source=source, domains=[domain], data_dir=data_dir,
                       num_fewshot=int(num_fewshot))
    task = suite.tasks[0]
    return datasets.DatasetDict({
        "test": datasets.Dataset.from_list([_doc(i, domain) for i in task.items]),
        "fewshot": datasets.Dataset.from_list([_doc(s, domain) for s in task.shots]),
    })


def process_gen_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    predicted = extract_letter(results[0], doc["choices"])
    return {"acc": float(predicted == doc["answer"])}
