"""Greedy generation with the Leaderboard's answer extraction (``brmerge eval --gen`` and the
``leaderboard`` suite).

Our own loop over the same contexts as the lm-eval ``generate_until`` tasks (``ptbr_*_gen``,
``ptbr_enem_challenge``, ``ptbr_oab_exams``): greedy decoding of at most the task's
``max_gen_toks`` tokens, cut at the first blank line (the few-shot delimiter), then
:func:`benchmarks_ptbr.extract.extract_letter`. Contexts are left-truncated to
``max_length - max_gen_toks`` tokens, as lm-eval does. With ``chat_template=True`` the
prompt is the chat-template rendering of the task's turns, as ``lm_eval
--apply_chat_template --fewshot_as_multiturn`` builds it. Slower than the log-likelihood
evaluator and meant for reports comparable with published numbers, not for search.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks_ptbr.extract import extract_letter
from benchmarks_ptbr.prompts import GEN_UNTIL
from benchmarks_ptbr.suite import Suite
from evals import chat
from evals.harness import resolve_max_length, task_contexts
from evals.results import EvalResult, ItemResult, suite_meta, summarize


def _encode(tokenizer: Any, text: str) -> list[int]:
    # lm-eval's tok_batch_encode: no special tokens when the text starts with the BOS string.
    bos = getattr(tokenizer, "bos_token", None)
    kwargs = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
    return list(tokenizer(text, **kwargs)["input_ids"])


def evaluate_generation(model: torch.nn.Module, tokenizer: Any, suite: Suite, *,
                        batch_size: int = 8, max_length: int | None = None,
                        chat_template: bool = False, progress: bool = False) -> EvalResult:
    if chat_template:
        chat.require_chat_template(tokenizer)
    device = next(model.parameters()).device
    max_length = max_length or resolve_max_length(model, tokenizer)
    work = []
    for task, item, context in task_contexts(suite, tokenizer, chat_template=chat_template):
        keep = max(1, max_length - task.max_gen_toks)
        work.append((task, item, _encode(tokenizer, context)[-keep:]))
    # Batches hold one task each (one generation budget), longest first.
    order = sorted(range(len(work)), key=lambda i: (work[i][0].name, -len(work[i][2])))
    chunks: list[list[int]] = []
    for i in order:
        if chunks and len(chunks[-1]) < batch_size and work[chunks[-1][0]][0] is work[i][0]:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    texts: dict[int, str] = {}
    pad = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
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
                                     max_new_tokens=work[chunk[0]][0].max_gen_toks,
                                     do_sample=False, pad_token_id=pad)
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
                                              gold=item.answer, correct=pred == item.answer,
                                              output=texts[i]))
    tasks = {t.name: summarize(t.name, t.domain, t.chance, per_task[t.name], smooth=False)
             for t in suite.tasks}
    return EvalResult(tasks=tasks, items=[i for t in suite.tasks for i in per_task[t.name]],
                      skipped=suite.skipped,
                      meta={"source": suite.source, "split": suite.split, "limit": suite.limit,
                            "num_fewshot": suite.num_fewshot, "mode": "generation",
                            "chat_template": chat_template, **suite_meta(suite)})
