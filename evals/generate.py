"""Greedy generation with the Leaderboard's answer extraction (``brmerge eval --gen`` and the
``leaderboard`` suite).

Two prompt paths over the same loop:

- the ``ptbr_*_gen`` tasks: the contexts of the lm-eval ``generate_until`` tasks, as stock
  lm-eval builds them (``--apply_chat_template --fewshot_as_multiturn`` with
  ``chat_template=True``), left-truncated to ``max_length - max_gen_toks`` tokens;
- the ``leaderboard`` suite: as the Leaderboard's harness builds them
  (eduagarcia/lm-evaluation-harness-pt @ ca07215, ``lm_eval/models/huggingface.py``): the
  era's budget (:func:`benchmarks_ptbr.leaderboard.budget`), chat rendering by
  :func:`evals.chat.leaderboard_turns` when the model has a template, and a context above
  ``max_length - max_gen_toks`` tokens loses its last shot, then the next, then its left end
  (``tok_batch_encode``).

Then greedy decoding of the budget's new tokens (no stop criterion, as the harness), the
harness's post-processing (:func:`benchmarks_ptbr.extract.clean_generation`) and letter
extraction. Slower than the log-likelihood evaluator and meant for reports comparable with
published numbers, not for search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from benchmarks_ptbr.extract import clean_generation, extract_letter
from benchmarks_ptbr.leaderboard import DEFAULT_ERA, LEADERBOARD, budget, normalized
from benchmarks_ptbr.prompts import FEWSHOT_DELIMITER, GEN_UNTIL, TARGET_DELIMITER, format_query
from benchmarks_ptbr.suite import Suite, Task
from evals import chat
from evals.harness import resolve_max_length, task_contexts
from evals.results import EvalResult, ItemResult, suite_meta, summarize

_HARNESS_MAX_POSSIBLE = 262144  # HFLM._MAXIMUM_POSSIBLE_LENGTH
_HARNESS_DEFAULT = {"2024": 2048, "2025": 4096}  # HFLM._DEFAULT_MAX_LENGTH then and now


def harness_max_length(model: torch.nn.Module, tokenizer: Any, *, era: str) -> int:
    """HFLM.max_length before its start cap: the model config's ``n_positions``,
    ``max_position_embeddings`` or ``n_ctx``, else the tokenizer's limit, else the default."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, attr, None) is not None:  # the harness: hasattr (None would crash it)
            return int(getattr(config, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit <= _HARNESS_MAX_POSSIBLE:
        return int(limit)
    return _HARNESS_DEFAULT[era]


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    shots_used: int  # after the harness's shot dropping


def _plain_text(task: Task, shots: int, item: Any) -> str:
    # the harness's _construct_text_input: its delimiter follows the shots even when none is left
    pairs = [format_query(s, task.domain) + TARGET_DELIMITER + s.answer for s in task.shots[:shots]]
    return (task.description + FEWSHOT_DELIMITER.join(pairs) + FEWSHOT_DELIMITER
            + format_query(item, task.domain))


def leaderboard_prompt(tokenizer: Any, task: Task, item: Any, *, chat_type: str | None,
                       max_ctx_len: int) -> Prompt:
    """The token ids the harness feeds the model for ``item`` (shots dropped to fit)."""
    import jinja2

    def text(shots: int) -> str:
        if chat_type is None:
            whole = shots == len(task.shots)
            return task.context(item) if whole else _plain_text(task, shots, item)
        pairs = [(format_query(s, task.domain), s.answer) for s in task.shots[:shots]]
        turns = chat.leaderboard_turns(task.description, pairs, format_query(item, task.domain),
                                       chat_type=chat_type)
        try:
            return chat.render_turns(tokenizer, turns)
        except jinja2.exceptions.TemplateError as exc:
            # e.g. a "user_assistant" template with no shot left: two user turns in a row
            why = str(exc).replace("\n", " ")
            raise chat.ChatTemplateError(
                f"{item.id}: with {shots} shots (dropped to fit {max_ctx_len} tokens) the chat "
                f"template rejects the turns ({why}); the Leaderboard's harness fails here too; "
                "pass --no-chat-template") from None

    special = chat_type is None  # rendered chat is encoded without special tokens
    shots = len(task.shots)
    ids = tokenizer(text(shots), add_special_tokens=special)["input_ids"]
    while len(ids) > max_ctx_len and shots > 0:
        shots -= 1
        ids = tokenizer(text(shots), add_special_tokens=special)["input_ids"]
    if len(ids) > max_ctx_len:  # left-truncate, keeping a leading special token
        keep_first = special and ids[0] in set(tokenizer.all_special_ids)
        ids = ids[:1] + ids[len(ids) - max_ctx_len + 1:] if keep_first else ids[-max_ctx_len:]
    return Prompt(list(ids), shots)


def _encode(tokenizer: Any, text: str) -> list[int]:
    # lm-eval's tok_batch_encode: no special tokens when the text starts with the BOS string.
    bos = getattr(tokenizer, "bos_token", None)
    kwargs = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
    return list(tokenizer(text, **kwargs)["input_ids"])


def resolve_chat(tokenizer: Any, chat_template: bool | None, *,
                 model: str = "the model") -> str | None:
    """The leaderboard's chat layout: ``None`` (auto) follows the harness (chat when the
    template renders), ``True`` requires a template, ``False`` turns chat off."""
    if chat_template is False:
        return None
    if chat_template:
        chat.require_chat_template(tokenizer, model=model)
    chat_type = chat.leaderboard_chat_type(tokenizer)
    if chat_template and chat_type is None:
        raise chat.ChatTemplateError(
            f"the chat template of {model} rejects every turn layout the Leaderboard tries "
            "(system, assistant or user description); pass --no-chat-template")
    return chat_type


def evaluate_generation(model: torch.nn.Module, tokenizer: Any, suite: Suite, *,
                        batch_size: int = 8, max_length: int | None = None,
                        chat_template: bool | None = False, era: str = DEFAULT_ERA,
                        progress: bool = False) -> EvalResult:
    device = next(model.parameters()).device
    work, meta = [], {}
    if suite.source == LEADERBOARD:
        chat_type = resolve_chat(tokenizer, chat_template)
        plan = budget(era, max_length or harness_max_length(model, tokenizer, era=era))
        dropped = 0
        for task in suite.tasks:
            for item in task.items:
                prompt = leaderboard_prompt(tokenizer, task, item, chat_type=chat_type,
                                            max_ctx_len=plan.max_ctx_len)
                work.append((task, item, prompt.ids, plan.max_gen_toks))
                dropped += len(task.shots) - prompt.shots_used
        meta = {"leaderboard_era": era, "chat_type": chat_type, "max_length": plan.max_length,
                "max_gen_toks": plan.max_gen_toks, "shots_dropped": dropped,
                "n_available": {t.name: t.n_available for t in suite.tasks}}
        chat_on = chat_type is not None
    else:
        chat_on = bool(chat_template)
        if chat_on:
            chat.require_chat_template(tokenizer)
        max_length = max_length or resolve_max_length(model, tokenizer)
        for task, item, context in task_contexts(suite, tokenizer, chat_template=chat_on):
            keep = max(1, max_length - task.max_gen_toks)
            work.append((task, item, _encode(tokenizer, context)[-keep:], task.max_gen_toks))
    texts = _generate(model, tokenizer, work, batch_size=batch_size, device=device,
                      progress=progress)
    # the harness strips reasoning since 2025-01; stock lm-eval (the _gen tasks) never does
    strip_think = suite.source == LEADERBOARD and era != "2024"
    per_task: dict[str, list[ItemResult]] = {t.name: [] for t in suite.tasks}
    for i, (task, item, _, _) in enumerate(work):
        output = clean_generation(texts[i], until=GEN_UNTIL, strip_think=strip_think)
        pred = extract_letter(output, item.labels)
        per_task[task.name].append(ItemResult(task=task.name, id=item.id, pred=pred,
                                              gold=item.answer, correct=pred == item.answer,
                                              output=output))
    tasks = {t.name: summarize(t.name, t.domain, t.chance, per_task[t.name], smooth=False)
             for t in suite.tasks}
    if suite.source == LEADERBOARD:
        meta["normalized"] = {t.name: normalized(tasks[t.name].acc, t.domain) for t in suite.tasks}
    return EvalResult(tasks=tasks, items=[i for t in suite.tasks for i in per_task[t.name]],
                      skipped=suite.skipped,
                      meta={"source": suite.source, "split": suite.split, "limit": suite.limit,
                            "num_fewshot": suite.num_fewshot, "mode": "generation",
                            "chat_template": chat_on, **meta, **suite_meta(suite)})


def _generate(model: torch.nn.Module, tokenizer: Any, work: list, *, batch_size: int,
              device: torch.device, progress: bool) -> dict[int, str]:
    """Decoded greedy continuations of ``work``'s prompts, batched by budget, longest first."""
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
                ids = torch.full((len(chunk), longest), pad, dtype=torch.long)  # [B, S] left-padded
                mask = torch.zeros_like(ids)
                for row, i in enumerate(chunk):
                    tokens = work[i][2]
                    ids[row, longest - len(tokens):] = torch.tensor(tokens)
                    mask[row, longest - len(tokens):] = 1
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=work[chunk[0]][3], do_sample=False,
                                     pad_token_id=pad)
                for row, i in enumerate(chunk):
                    texts[i] = tokenizer.decode(out[row, longest:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return texts
