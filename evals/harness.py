"""The resident evaluator: built once per process, then ``evaluate(model)`` per candidate.

Everything that does not depend on the weights is done at construction: items, shots,
prompts, and the tokenized requests. A candidate then costs one batched forward pass per
question and a few tensor ops. It computes what the lm-eval ``multiple_choice`` task
``ptbr_<domain>_<split>`` computes: one request ``(context, " " + letter)`` per option,
tokenized as lm-eval does (context alone, then context + continuation, the continuation
being the difference), log-likelihood of the continuation, ``acc`` = argmax == gold. Since
every option is one letter, the options share the context and differ only in the last
token, so one forward pass over the shared part scores them all from its last position.

Two more savings, both exact up to float rounding: batches are left-padded with explicit
positions and only the last position's logits are computed (``logits_to_keep=1``); and
the tokens every item of a task starts with (description and few-shot examples, most of
each prompt) are run once per task and candidate, then reused through the KV cache
(:mod:`evals.kv`, the only code that touches transformers' cache). Where a cached prefix
would not be exact (a sliding window or attention chunk shorter than the prompt, or layers
that are not attention), the task runs full sequences instead, by itself.

Memory. A forward's KV cache and activations grow with its tokens, and ``max_batch_tokens``
(``batch_tokens``) bounds them: :func:`batch_memory_tokens` is the rule. At the peak of a batch
of ``rows`` rows, each ``row_len`` tokens long after a shared prefix of ``prefix_len`` tokens,
the evaluator holds KV for the one-row prefix cache (``prefix_len``, kept for the next batch)
plus its widened copy and the rows' own tokens (``rows * (prefix_len + row_len)``), and runs
activations for ``rows * row_len`` tokens; logits exist for the last position only, ``rows *
vocab`` values. Without a shared prefix ``prefix_len`` is 0 and a row is the whole prompt.
Batches are built so that this never exceeds the budget; a single prompt that alone does
not fit is refused, naming the budget it needs.

Dtype. Log-likelihoods are taken in the model's own dtype, as lm-eval's HFLM takes them
(``log_softmax`` of the logits as the model returns them), so a bfloat16 model scores as stock
lm-eval run with ``dtype=bfloat16`` scores it; probabilities over the letters in float32.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks_ptbr.fewshot import DEFAULT_NUM_FEWSHOT
from benchmarks_ptbr.prompts import TARGET_DELIMITER
from benchmarks_ptbr.suite import Suite, load_suite
from evals import chat, kv
from evals.batching import Batch, Group, batch_memory_tokens, make_batches, rows_within
from merge_core.errors import BrmergeError
from evals.results import EvalResult, ItemResult, suite_meta, summarize

PURPOSES = ("search", "report")
DEFAULT_BATCH_TOKENS = 16384  # KV tokens per forward (batch_memory_tokens): fits small GPUs/CPUs
DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_LENGTH = 2048     # lm-eval's fallback when neither config nor tokenizer says


def resolve_max_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """The context length lm-eval's HFLM would use (config first, then the tokenizer)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    if limit is not None and limit < 1e12:
        return int(limit)
    return DEFAULT_MAX_LENGTH


@dataclass(frozen=True)
class _Request:
    """One question, tokenized: the shared prefix and the token of each option letter."""

    task: str
    item_id: str
    prefix: tuple[int, ...]        # context tokens (+ any continuation tokens all letters share)
    letter_tokens: tuple[int, ...]  # aligned with ``labels``
    labels: tuple[str, ...]
    gold: int                       # index into ``labels``


def task_contexts(suite: Suite, tokenizer: Any, *, chat_template: bool) -> list[tuple[Any, Any, str]]:
    """``(task, item, context)`` per scored item: the plain-text prompt, or the chat-template
    rendering of its turns (as lm-eval's ``--apply_chat_template --fewshot_as_multiturn``)."""
    out = []
    for task in suite.tasks:
        for item in task.items:
            context = (chat.render(tokenizer, task.messages(item)) if chat_template
                       else task.context(item))
            out.append((task, item, context))
    return out


def _tokenize_requests(tokenizer: Any, suite: Suite, *, chat_template: bool) -> list[_Request]:
    contexts: list[str] = []
    meta = []
    # lm-eval puts no delimiter before the answer after a chat template's generation prompt.
    delimiter = "" if chat_template else TARGET_DELIMITER
    for task, item, context in task_contexts(suite, tokenizer, chat_template=chat_template):
        # lm-eval moves trailing whitespace of the context into the continuation.
        stripped = context.rstrip()
        moved = context[len(stripped):]
        contexts.append(stripped)
        meta.append((task.name, item, [moved + delimiter + lab for lab in item.labels]))
    if not contexts:
        return []
    # Special tokens as lm-eval's HFLM encodes them (add_bos_token unset): see chat.encode.
    context_ids = chat.encode(tokenizer, contexts)
    wholes = [c + cont for c, (_, _, conts) in zip(contexts, meta) for cont in conts]
    whole_ids = iter(chat.encode(tokenizer, wholes))
    requests = []
    for ctx, (task_name, item, conts) in zip(context_ids, meta):
        continuations = [next(whole_ids)[len(ctx):] for _ in conts]
        shared = continuations[0][:-1]
        if (any(len(c) == 0 or c[:-1] != shared for c in continuations)
                or len({c[-1] for c in continuations}) != len(continuations)):
            raise EvalError(
                f"{task_name} item {item.id!r}: with this tokenizer the answer letters "
                f"{list(item.labels)} do not end in one distinct token each after a shared "
                f"prefix ({[list(c) for c in continuations]}); the single-pass evaluator cannot "
                "score them; use lm-eval with the task folder for this tokenizer")
        requests.append(_Request(
            task=task_name, item_id=item.id, prefix=tuple(ctx) + tuple(shared),
            letter_tokens=tuple(c[-1] for c in continuations), labels=item.labels,
            gold=item.labels.index(item.answer)))
    return requests


class EvalError(BrmergeError):
    """The evaluator cannot score as asked; the message names the option and the fix."""


def _refusal(split: str) -> str:
    return (f"refusing to score the {split} split for search: {split} items are held out for "
            "reports (the leaderboard suite also repeats dev items); search on split='dev', or "
            "pass allow_test=True if you really mean it")


def _forward_params(model: torch.nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


class Evaluator:
    """Scores a live model on one suite; build once, call :meth:`evaluate` per candidate.

    ``purpose="search"`` (the default) refuses a test-split suite unless ``allow_test=True``:
    held-out test scores are for reports, not for choosing candidates.
    """

    def __init__(self, tokenizer: Any, suite: Suite, *, purpose: str = "search",
                 allow_test: bool = False, max_length: int | None = None,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, max_batch: int = DEFAULT_MAX_BATCH,
                 share_prefix: bool = True, chat_template: bool = False,
                 first: Collection[tuple[str, str]] = ()):
        if purpose not in PURPOSES:
            raise EvalError(f"purpose={purpose!r}; choose 'search' or 'report'")
        if purpose == "search" and suite.split != "dev" and not allow_test:
            raise EvalError(_refusal(suite.split))
        if batch_tokens < 1 or max_batch < 1:
            raise EvalError(f"batch_tokens={batch_tokens} and max_batch={max_batch} must be >= 1")
        self.suite = suite
        self.tokenizer = tokenizer
        self.purpose = purpose
        self.max_length = max_length
        self.batch_tokens = batch_tokens
        self.max_batch = max_batch
        if chat_template:
            chat.require_chat_template(tokenizer)
        self.chat_template = chat_template
        self.requests = _tokenize_requests(tokenizer, suite, chat_template=chat_template)
        self.pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0)
                            if t is not None))
        self.share_prefix = share_prefix
        # (task, item id) of the ``first`` part: batched apart (see scores), e.g. stage 1's items
        self._first_keys = frozenset(first)
        self._first = {i for i, r in enumerate(self.requests) if (r.task, r.item_id) in self._first_keys}
        self._tasks = {r.task for r in self.requests}   # tasks with items to score
        self._groups: dict[tuple[str, int], list[Group]] = {}
        self._forward_params: dict[type, set[str]] = {}
        # task -> whether the last evaluate() reused a cached prefix for it (see evals.kv)
        self.shared_prefix: dict[str, bool] = {}

    @classmethod
    def for_suite(cls, tokenizer: Any, *, split: str = "dev", source: str = "sample",
                  data_dir: str | Path | None = None, domains: Sequence[str] | None = None,
                  limit: int | None = None, num_fewshot: int = DEFAULT_NUM_FEWSHOT,
                  purpose: str = "search", allow_test: bool = False,
                  **options: Any) -> Evaluator:
        """Load the suite and build the evaluator in one call (see :func:`load_suite`)."""
        if purpose == "search" and split != "dev" and not allow_test:
            # Refuse before loading anything, with the same message as the constructor.
            raise EvalError(_refusal(split))
        suite = load_suite(split=split, source=source, domains=domains, data_dir=data_dir,
                           limit=limit, num_fewshot=num_fewshot)
        return cls(tokenizer, suite, purpose=purpose, allow_test=allow_test, **options)

    # -- batches ----------------------------------------------------------------------------

    def _build_groups(self, model: torch.nn.Module, device: torch.device,
                      max_length: int) -> list[Group]:
        by_task: dict[str, list[int]] = {}
        for index, request in enumerate(self.requests):
            by_task.setdefault(request.task, []).append(index)
        return [self._build_group(task, indices, device, max_length,
                                  share=self.share_prefix and self._shareable(model, indices))
                for task, indices in by_task.items()]

    def _common_prefix(self, indices: list[int]) -> int:
        """Longest common token prefix, leaving each item at least its last token to score."""
        prefixes = [self.requests[i].prefix for i in indices]
        first = prefixes[0]
        shared = min(len(p) for p in prefixes) - 1
        for p in prefixes:
            shared = next((k for k in range(shared) if p[k] != first[k]), shared)
        return shared

    def _shareable(self, model: torch.nn.Module, indices: list[int]) -> bool:
        longest = max(len(self.requests[i].prefix) for i in indices)
        # Sharing holds the rows' padding between prefix and tail: the span a forward sees is
        # the shared prefix plus the longest tail, i.e. the longest prefix.
        return kv.can_share_prefix(model, longest)

    def _build_group(self, task: str, indices: list[int], device: torch.device,
                     max_length: int, *, share: bool) -> Group:
        prefixes = {i: self.requests[i].prefix for i in indices}
        shared = 0
        if share and all(len(p) <= max_length for p in prefixes.values()):
            shared = self._common_prefix(indices)
        else:
            # lm-eval keeps the last ``max_length`` tokens of context + continuation minus the
            # scored token, i.e. the last ``max_length`` tokens of the prefix.
            prefixes = {i: p[-max_length:] for i, p in prefixes.items()}
        tails = {i: p[shared:] for i, p in prefixes.items()}
        width = max(len(self.requests[i].labels) for i in indices)
        batches: list[Batch] = []
        # The ``first`` part's rows are batched apart from the rest, so scoring a part alone
        # runs exactly the batches a whole evaluation runs (bit-identical per item).
        for part in (True, False):
            order = sorted((i for i in indices if (i in self._first) == part),
                           key=lambda i: -len(tails[i]))
            if order and rows_within(self.batch_tokens, shared, len(tails[order[0]]),
                                     max_rows=self.max_batch) == 0:
                need = batch_memory_tokens(1, shared, len(tails[order[0]]))
                raise EvalError(f"{task}: one prompt needs {need} KV tokens ({shared} shared + "
                                f"{len(tails[order[0]])} own) but max_batch_tokens is "
                                f"{self.batch_tokens}: raise max_batch_tokens to at least {need}")
            batches += make_batches(
                order, tails, self.requests, shared=shared,
                width=width, device=device, pad_id=self.pad_id, budget=self.batch_tokens,
                max_rows=self.max_batch, first=part)
        prefix = (torch.tensor([prefixes[indices[0]][:shared]], device=device)
                  if shared > 0 else None)
        return Group(task=task, indices=indices, prefix=prefix, batches=batches)

    def _groups_for(self, model: torch.nn.Module, device: torch.device) -> list[Group]:
        max_length = self.max_length or resolve_max_length(model, self.tokenizer)
        key = (str(device), max_length, kv.attention_window(model), type(model))
        if key not in self._groups:
            self._groups[key] = self._build_groups(model, device, max_length)
        return self._groups[key]

    # -- scoring ----------------------------------------------------------------------------

    def _params(self, model: torch.nn.Module) -> set[str]:
        kind = type(model)
        if kind not in self._forward_params:
            self._forward_params[kind] = _forward_params(model)
        return self._forward_params[kind]

    def _extra(self, model: torch.nn.Module) -> dict[str, Any]:
        return {"logits_to_keep": 1} if "logits_to_keep" in self._params(model) else {}

    def _cache_arg(self, model: torch.nn.Module) -> str:
        # transformers 5 names the KV-cache argument ``cache``; 4.x ``past_key_values``.
        return "cache" if "cache" in self._params(model) else "past_key_values"

    def _group_cache(self, model: torch.nn.Module, groups: list[Group], at: int,
                     device: torch.device, max_length: int) -> Any | None:
        """The group's shared-prefix cache, or None to run its full sequences. A model that
        returns no widenable cache gets the group rebuilt unshared, once (never an error)."""
        group = groups[at]
        if group.prefix is None:
            return None
        cache = kv.prefix_cache(model, group.prefix, **self._extra(model))
        if cache is None:
            groups[at] = self._build_group(group.task, group.indices, device, max_length,
                                           share=False)
        return cache

    def _forward_last(self, model: torch.nn.Module, batch: Batch, cache: Any) -> torch.Tensor:
        extra = self._extra(model)
        if cache is not None:
            extra[self._cache_arg(model)] = kv.widen(cache, batch.input_ids.shape[0])
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, use_cache=cache is not None, **extra)
        return out.logits[:, -1, :]  # [B, V]

    def evaluate(self, model: torch.nn.Module, *, progress: bool = False) -> EvalResult:
        """Score ``model`` (a live module; its weights may have changed since the last call)."""
        if not self.requests:
            return EvalResult(tasks={}, items=[], skipped=self.suite.skipped)
        return self.result_of(self.scores(model, progress=progress))

    def scores(self, model: torch.nn.Module, *, part: str | None = None,
               progress: bool = False) -> dict[int, tuple[int, float]]:
        """{request index: (predicted option, gold probability)} of the requests of ``part``:
        None for all, ``"first"`` for those whose key was in ``first``, ``"rest"`` for the
        others. A part runs the very batches a whole evaluation runs, so its values are
        bit-identical to the same requests' in :meth:`evaluate`."""
        if part not in (None, "first", "rest"):
            raise EvalError(f"part={part!r}; choose None, 'first' or 'rest'")
        if not self.requests:
            return {}
        device = next(model.parameters()).device
        max_length = self.max_length or resolve_max_length(model, self.tokenizer)
        groups = self._groups_for(model, device)
        wanted = (lambda b: True) if part is None else (lambda b: b.first == (part == "first"))
        n = len(self.requests)
        pred = torch.zeros(n, dtype=torch.long, device=device)
        done: list[torch.Tensor] = []
        gold_prob = torch.zeros(n, dtype=torch.float32, device=device)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(wanted(b) for g in groups for b in g.batches), desc="scoring",
                       unit="batch")
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for at in range(len(groups)):
                    if not any(wanted(b) for b in groups[at].batches):
                        continue
                    cache = self._group_cache(model, groups, at, device, max_length)
                    group = groups[at]
                    self.shared_prefix[group.task] = cache is not None
                    for batch in filter(wanted, group.batches):
                        done.append(batch.rows)
                        logits = self._forward_last(model, batch, cache)  # [B, V], model dtype
                        # In the model's dtype, as lm-eval's HFLM (float32 unless a bf16/fp16 model).
                        ll = logits.log_softmax(-1).gather(1, batch.letters).float()  # [B, K]
                        ll = ll.masked_fill(~batch.valid, float("-inf"))
                        pred[batch.rows] = ll.argmax(-1)  # first maximum on ties, as np.argmax
                        probs = ll.softmax(-1)                                  # over letters
                        gold_prob[batch.rows] = probs.gather(1, batch.gold[:, None]).squeeze(1)
                        if bar is not None:
                            bar.update(1)
        finally:
            model.train(was_training)
            if bar is not None:
                bar.close()
        rows = torch.cat(done).tolist() if done else []
        pred_l, prob_l = pred.tolist(), gold_prob.tolist()
        return {i: (pred_l[i], prob_l[i]) for i in sorted(rows)}

    def keys(self, part: str | None = None) -> list[tuple[str, str]]:
        """(task, item id) of each request of ``part`` (see :meth:`scores`), in order."""
        return [(r.task, r.item_id) for r in self.requests
                if part is None or ((r.task, r.item_id) in self._first_keys) == (part == "first")]

    def result_of(self, scores: dict[int, tuple[int, float]]) -> EvalResult:
        """The result over the requests ``scores`` holds (all of them: a whole evaluation)."""
        per_task: dict[str, list[ItemResult]] = {t.name: [] for t in self.suite.tasks}
        for index in sorted(scores):
            request, (p, g) = self.requests[index], scores[index]
            per_task[request.task].append(ItemResult(
                task=request.task, id=request.item_id, pred=request.labels[p],
                gold=request.labels[request.gold], correct=p == request.gold, gold_prob=g))
        tasks = {t.name: summarize(t.name, t.domain, t.chance, per_task[t.name], smooth=True)
                 for t in self.suite.tasks if per_task[t.name] or t.name not in self._tasks}
        items = [i for t in self.suite.tasks for i in per_task[t.name]]
        return EvalResult(tasks=tasks, items=items, skipped=self.suite.skipped,
                          meta={"source": self.suite.source, "split": self.suite.split,
                                "limit": self.suite.limit, "num_fewshot": self.suite.num_fewshot,
                                "mode": "loglikelihood", "chat_template": self.chat_template,
                                **suite_meta(self.suite)})
