"""The one place that touches transformers' KV cache: share a prompt prefix across rows.

The evaluator runs the tokens every item of a task starts with once, then scores each batch
of items on top of that prefix's cache. Only public API is used: the ``Cache`` object a
forward returns, ``copy.deepcopy`` and ``Cache.batch_repeat_interleave`` (what beam search
uses to widen a cache), so every cache layout transformers builds for a model (full
attention, sliding windows, hybrid full/sliding like Gemma 2 and 3) goes through the same
code. Where sharing would not be exact, :func:`can_share_prefix` says no and the evaluator
runs full sequences instead, as lm-eval does; it never raises.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

# Attention layer kinds whose cache is keys/values per position, so a shared prefix followed
# by left padding (masked) and the row's own tokens is exact. Recurrent or linear-attention
# layers would also consume the padding, so a model with any other kind runs unshared.
_ATTENTION_KINDS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})


def _text_config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        return config.get_text_config(decoder=True)
    return config


def attention_window(model: torch.nn.Module) -> int | None:
    """The smallest attention span of any layer (sliding window or attention chunk), or
    ``None`` when every layer attends to the whole sequence."""
    config = _text_config(model)
    if config is None:
        return None
    windows = []
    kinds = set(getattr(config, "layer_types", None) or ())
    sliding = getattr(config, "sliding_window", None)
    # Qwen2-style configs carry a window that is off unless use_sliding_window is set.
    if sliding is not None and getattr(config, "use_sliding_window", True) is not False:
        if not kinds or "sliding_attention" in kinds:
            windows.append(int(sliding))
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is not None and (not kinds or "chunked_attention" in kinds):
        windows.append(int(chunk))
    return min(windows) if windows else None


def can_share_prefix(model: torch.nn.Module, total_length: int) -> bool:
    """Whether a cached prefix gives exactly what a full forward of ``total_length`` tokens
    (prefix + padding + the longest row) gives: every layer is an attention layer, and no
    sliding window or attention chunk is shorter than the sequence (then no layer drops or
    masks a prefix token that the full forward would still see)."""
    config = _text_config(model)
    kinds = set(getattr(config, "layer_types", None) or ())
    if kinds - _ATTENTION_KINDS:
        return False
    window = attention_window(model)
    return window is None or total_length < window


def prefix_cache(model: torch.nn.Module, prefix: torch.Tensor, **extra: Any) -> Any | None:
    """Run ``prefix`` [1, P] and return its cache, or ``None`` when the model returns none or
    one that cannot be widened to a batch."""
    out = model(input_ids=prefix, use_cache=True, **extra)
    # transformers 5 names the output ``cache``; 4.x ``past_key_values``.
    cache = out.get("cache") if "cache" in out else out.get("past_key_values")
    if cache is None or not callable(getattr(cache, "batch_repeat_interleave", None)):
        return None
    return cache


def widen(cache: Any, rows: int) -> Any:
    """A fresh copy of a one-row prefix cache for a batch of ``rows`` (the forward appends the
    batch's own keys to it, so the original stays the prefix for the next batch)."""
    wide = copy.deepcopy(cache)
    wide.batch_repeat_interleave(rows)
    return wide
