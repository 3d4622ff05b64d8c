"""The evaluator's device batches, and the rule that bounds their memory.

:func:`batch_memory_tokens` is the rule ``max_batch_tokens`` bounds: the KV tokens one batch
holds at its peak. A memory planner predicts the evaluator's peak from it (see
:mod:`evals.harness`, "Memory").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

MIN_FILL = 0.75  # a batch row is at least this share of the batch's longest row: little padding


def batch_memory_tokens(rows: int, prefix_len: int, row_len: int) -> int:
    """KV tokens the evaluator holds at the peak of one batch: the one-row shared-prefix cache
    (``prefix_len``), its copy widened to ``rows`` rows and the rows' own (left-padded)
    tokens. The batch budget (``max_batch_tokens``) bounds this number; activations run on
    ``rows * row_len`` tokens of it, and logits on ``rows`` positions."""
    return (prefix_len if prefix_len else 0) + rows * (prefix_len + row_len)


def rows_within(budget: int, prefix_len: int, row_len: int, *, max_rows: int) -> int:
    """The most rows (at most ``max_rows``) whose batch stays within ``budget``; 0 when not even
    one row fits."""
    free = budget - prefix_len
    return max(0, min(max_rows, free // max(prefix_len + row_len, 1)))


@dataclass
class Batch:
    rows: torch.Tensor          # [B] request indices
    input_ids: torch.Tensor     # [B, S] left-padded (the part after the shared prefix, if any)
    attention_mask: torch.Tensor  # [B, P + S]: P shared-prefix ones, then the rows' own mask
    position_ids: torch.Tensor  # [B, S]
    letters: torch.Tensor       # [B, K] letter token ids (0 where the item has fewer options)
    valid: torch.Tensor         # [B, K] bool
    gold: torch.Tensor          # [B]
    first: bool = False         # its rows are all of the ``first`` part (see Evaluator)


@dataclass
class Group:
    """The batches of one task; ``prefix`` holds the tokens every item of the task starts with
    (description and shots), computed once per candidate and reused through the KV cache."""

    task: str
    indices: list[int]           # request indices of the task
    prefix: torch.Tensor | None  # [1, P], or None to run full sequences
    batches: list[Batch]


def make_batches(order: list[int], tails: dict[int, tuple[int, ...]], requests: Sequence[Any], *,
                 shared: int, width: int, device: torch.device, pad_id: int, budget: int,
                 max_rows: int, first: bool) -> list[Batch]:
    """The batches of the requests ``order`` (longest tail first): each within ``budget`` by
    :func:`batch_memory_tokens` (the caller checks that one row of the longest fits), of rows
    of similar length (``MIN_FILL``). ``tails[i]``: request ``i``'s tokens after the
    ``shared`` prefix."""
    batches: list[Batch] = []
    start = 0
    while start < len(order):
        longest = len(tails[order[start]])
        rows = max(1, rows_within(budget, shared, longest, max_rows=max_rows))
        chunk = order[start:start + rows]
        # Rows much shorter than the longest would be mostly padding: next batch.
        chunk = chunk[:next((k for k, i in enumerate(chunk)
                             if len(tails[i]) < MIN_FILL * longest), len(chunk))]
        start += len(chunk)
        ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)
        letters = torch.zeros((len(chunk), width), dtype=torch.long)
        valid = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, index in enumerate(chunk):
            tokens, request = tails[index], requests[index]
            ids[row, longest - len(tokens):] = torch.tensor(tokens)
            mask[row, longest - len(tokens):] = 1
            letters[row, :len(request.letter_tokens)] = torch.tensor(request.letter_tokens)
            valid[row, :len(request.letter_tokens)] = True
        # Left padding keeps every row's last real token at the last position; explicit
        # positions make padded rows see the positions an unpadded sequence would.
        positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
        full_mask = torch.cat([torch.ones((len(chunk), shared), dtype=torch.long), mask], 1)
        gold = torch.tensor([requests[i].gold for i in chunk])
        batches.append(Batch(
            rows=torch.tensor(chunk).to(device), input_ids=ids.to(device),
            attention_mask=full_mask.to(device), position_ids=positions.to(device),
            letters=letters.to(device), valid=valid.to(device), gold=gold.to(device),
            first=first))
    return batches
