"""Greedy generation with the Leaderboard's answer extraction (``brmerge eval --gen``).

Our own loop over the same contexts as the ``ptbr_*_gen`` lm-eval tasks: greedy decoding
of at most ``GEN_MAX_TOKENS`` tokens, cut at the first blank line (the few-shot delimiter),
then :func:`benchmarks_ptbr.extract.extract_letter`. Contexts are left-truncated to
``max_length - GEN_MAX_TOKENS`` tokens, as lm-eval does. Slower than the log-likelihood
evaluator and meant for reports comparable with published numbers, not for search.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks_ptbr.extract import extract_letter
from benchmarks_ptbr.lm_eval_tasks import GEN_MAX_TOKENS, GEN_UNTIL
from benchmarks_ptbr.suite import Suite
from evals.harness import resolve_max_length
from evals.results import EvalResult, ItemResult, summarize


def evaluate_generation(model: torch.nn.Module, tokenizer: Any, suite: Suite, *,
                        batch_size: int = 8, max_length: int | None = None,
                        progress: bool = False) -> EvalResult:
    device = next(model.parameters()).device
    max_length = max_length or resolve_max_length(model, tokenizer)
    keep = max(1, max_length - GEN_MAX_TOKENS)
    work = [(task, item, tokenizer(task.context(item))["input_ids"][-keep:])
            for task in suite.tasks for item in task.items]
    order = sorted(range(len(work)), key=lambda i: -len(work[i][2]))
    texts: dict[int, str] = {}
    pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="generating", unit="batch")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for chunk in chunks:
                longest = max(len(work[i][2]) for i in chunk)
                ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(chunk):
                    tokens = work[i][2]
                    ids[row, longest - len(tokens):] = torch.tensor(tokens)
                    mask[row, longest - len(tokens):] = 1
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=GEN_MAX_TOKENS, do_sample=False,
                                     pad_token_id=pad)
                for row, i in enumerate(chunk):
                    text = tokenizer.decode(out[row, longest:], skip_special_tokens=True)
                    for stop in GEN_UNTIL:
                        text = text.split(stop)[0]
                    texts[i] = text
    finally:
        model.train(was_training)
    per_task: dict[str, list[ItemResult]] = {t.name: [] for t in suite.tasks}
    for i, (task, item, _) in enumerate(work):
        pred = extract_letter(texts[i], item.labels)
        per_task[task.name].append(ItemResult(task=task.name, id=item.id, pred=pred,
                                              gold=item.answer, correct=pred == item.answer))
    tasks = {t.name: summarize(t.name, t.domain, t.chance, per_task[t.name], smooth=False)
             for t in suite.tasks}
    return EvalResult(tasks=tasks, items=[i for t in suite.tasks for i in per_task[t.name]],
                      skipped=suite.skipped,
                      meta={"source": suite.source, "split": suite.split, "limit": suite.limit,
                            "num_fewshot": suite.num_fewshot, "mode": "generation"})
