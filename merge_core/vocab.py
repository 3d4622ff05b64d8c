"""Vocabulary alignment: embedding and LM-head rows matched by token string, as mergekit does.

With ``tokenizer_source`` (base, union or a model) or a ``tokenizer:`` block, the output
vocabulary comes from that source and each model's vocabulary tensors are rebuilt row by row
for it before the merge: a token's row is the model's row for the same token string. A row
for a token a model lacks is filled (mergekit's rules, in this order): the recipe's
``tokenizer.tokens`` entry for it; the one model that has it; zeros when none has it; the
base model's row when the base has it; else the mean of the rows of the models that have it.
Rows added by ``pad_to_multiple_of`` are the mean of the real rows.

``plan_vocabulary`` works out all of this from the tokenizers before any tensor is read;
``AlignedFetch`` applies it while the merge reads.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_core.errors import MergeError, RecipeError
from merge_core.recipe import Recipe
from merge_core.sources import ModelSource

# Tensors whose first dimension is the vocabulary.
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "word_embeddings.weight",
                 "embed_out.weight", "tok_embeddings.weight", "output.weight")


def is_vocab_tensor(name: str) -> bool:
    return name.endswith(VOCAB_TENSORS)


@dataclass(frozen=True)
class Fill:
    """How to build output row ``row`` where a model has no row of its own (or ``force``):
    the mean of ``sources`` rows ((model, row in that model's tensor)); zeros when empty."""

    row: int
    sources: tuple[tuple[str, int], ...]
    force: bool = False


@dataclass(frozen=True)
class VocabPlan:
    size: int                                    # output rows, padding included
    tokens: int                                  # output tokens (size minus padding)
    rows: tuple[tuple[str, tuple[int, ...]], ...]  # model -> its row for each token, -1 if none
    configured: tuple[Fill, ...]                  # rows the recipe's tokenizer.tokens give
    base: str | None                              # the recipe's base model
    tokenizer_files: tuple[tuple[str, str], ...]  # the output tokenizer's files, when rebuilt
    source: str                                   # the model whose tokenizer is the output's, or "union"

    def rows_of(self, ref: str) -> tuple[int, ...]:
        return dict(self.rows)[ref]

    def fills_for(self, group: Sequence[str]) -> tuple[Fill, ...]:
        """The filled rows of a tensor merged from the models in ``group`` (mergekit decides
        them among the models of each tensor's merge, e.g. the last slice's for the head)."""
        rows = dict(self.rows)
        configured = {f.row: f for f in self.configured}
        base = self.base if self.base in group else None
        out = []
        for new in range(self.tokens):
            have = [r for r in group if rows[r][new] >= 0]
            cfg = configured.get(new)
            if cfg is not None:
                if cfg.force or len(have) < len(group):
                    out.append(cfg)
            elif len(have) == len(group):
                continue
            elif len(have) == 1:
                out.append(Fill(new, ((have[0], rows[have[0]][new]),)))
            elif not have:
                out.append(Fill(new, ()))
            elif base is not None and base in have:
                out.append(Fill(new, ((base, rows[base][new]),)))
            else:
                out.append(Fill(new, tuple((r, rows[r][new]) for r in have)))
        return tuple(out)


def plan_vocabulary(recipe: Recipe, sources: Mapping[str, ModelSource]) -> VocabPlan | None:
    """The output vocabulary and every model's row for each of its tokens (None without
    ``tokenizer_source``/``tokenizer``). Reads tokenizers only."""
    source = recipe.vocabulary_source()
    if source is None:
        return None
    from transformers import AutoTokenizer

    refs = recipe.referenced_models()
    base = recipe.base_model or refs[0]
    block = recipe.tokenizer or {}
    token_cfgs: Mapping[str, Any] = block.get("tokens") or {}
    pad = block.get("pad_to_multiple_of")

    def load(ref: str):
        try:
            return AutoTokenizer.from_pretrained(str(sources[ref].path), use_fast=True)
        except Exception as e:  # transformers raises many types for a missing/odd tokenizer
            raise MergeError(f"model {ref!r}: its tokenizer cannot be loaded ({e}): aligning "
                             "embeddings by token needs every model's tokenizer files") from e

    tokenizers = {ref: load(ref) for ref in refs}
    vocab_sizes = {ref: _vocab_size(sources[ref].config, len(tokenizers[ref].get_vocab())) for ref in refs}
    base_vocab = {t: i for t, i in tokenizers[base].get_vocab().items() if i < vocab_sizes[base]}
    if len(base_vocab) != len(tokenizers[base].get_vocab()):
        raise MergeError(f"base model {base!r} has tokenizer tokens beyond its {vocab_sizes[base]} embedding "
                         "rows: resize its embeddings to the tokenizer, or use tokenizer_source: <model>")

    out_tok = None
    rebuilt = False
    if source == "base":
        out_tok, out_source = tokenizers[base], base
    elif source == "union":
        out_tok, out_source, rebuilt = _union(tokenizers[base], tokenizers, vocab_sizes), "union", True
    else:
        out_tok, out_source = tokenizers[source], source
    added = [t for t in token_cfgs if t not in out_tok.get_vocab()]
    if added:
        if not rebuilt:
            out_tok = _copy(out_tok)
            rebuilt = True
        out_tok.add_tokens(added)
    vocab = out_tok.get_vocab()                                               # token -> output row
    n = len(vocab)
    size = n if not pad or n % pad == 0 else n + pad - n % pad

    rows: dict[str, list[int]] = {}
    for ref in refs:
        model_vocab = tokenizers[ref].get_vocab() if ref != base else base_vocab
        r = [-1] * n
        for token, new in vocab.items():
            old = model_vocab.get(token)
            if old is not None and old < vocab_sizes[ref]:
                r[new] = old
        rows[ref] = r

    configured = _configured_fills(vocab, rows, refs=refs, token_cfgs=token_cfgs, tokenizers=tokenizers,
                                   vocab_sizes=vocab_sizes)
    files: tuple[tuple[str, str], ...] = ()
    if rebuilt:
        with tempfile.TemporaryDirectory() as tmp:
            out_tok.save_pretrained(tmp)
            files = tuple((p.name, p.read_text(encoding="utf-8")) for p in sorted(Path(tmp).iterdir())
                          if p.is_file())
    return VocabPlan(size=size, tokens=n, rows=tuple((ref, tuple(r)) for ref, r in rows.items()),
                     configured=tuple(configured), base=recipe.base_model, tokenizer_files=files,
                     source=out_source)


def _vocab_size(config: Mapping[str, Any], fallback: int) -> int:
    for cfg in (config, config.get("text_config") or {}):
        if isinstance(cfg.get("vocab_size"), int):
            return int(cfg["vocab_size"])
    return fallback


def _copy(tok):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, use_fast=True)


def _union(base_tok, tokenizers: Mapping[str, Any], vocab_sizes: Mapping[str, int]):
    """The base tokenizer plus every other model's tokens (added tokens keep their settings,
    the first model's when they differ), as mergekit builds its union."""
    plain: dict[str, None] = {}
    special: dict[str, Any] = {}
    for ref, tok in tokenizers.items():
        added = tok.added_tokens_decoder                                        # id -> AddedToken
        added_text = {info.content for info in added.values()}
        for token, i in tok.get_vocab().items():
            if i < vocab_sizes[ref] and token not in added_text:
                plain.setdefault(token)
        for i, info in added.items():
            if i < vocab_sizes[ref]:
                special.setdefault(info.content, info)
    out = _copy(base_tok)
    base_vocab = base_tok.get_vocab()
    for token in plain:
        if token not in special and token not in base_vocab:
            out.add_tokens(token)
    for info in special.values():
        out.add_tokens(info)
    return out


def _configured_fills(vocab: Mapping[str, int], rows: Mapping[str, list[int]], *, refs: Sequence[str],
                      token_cfgs: Mapping[str, Any], tokenizers: Mapping[str, Any],
                      vocab_sizes: Mapping[str, int]) -> list[Fill]:
    """The rows ``tokenizer.tokens`` gives, checked now (before any tensor is read) for every
    token some model lacks or that is forced."""
    fills = []
    for token, cfg in token_cfgs.items():
        new = vocab[token]
        force = bool(cfg.get("force", False))
        if not force and all(rows[ref][new] >= 0 for ref in refs):
            continue
        if cfg.get("source") is None:
            raise RecipeError(f"tokenizer.tokens[{token!r}] needs a source: some models lack the token "
                              "(or force is set), so name where its row comes from")
        fills.append(Fill(new, _configured(token, new, cfg["source"], rows=rows, tokenizers=tokenizers,
                                           vocab_sizes=vocab_sizes), force))
    return fills


def _configured(token: str, new: int, src: Any, *, rows: Mapping[str, list[int]], tokenizers: Mapping[str, Any],
                vocab_sizes: Mapping[str, int]) -> tuple[tuple[str, int], ...]:
    where = f"tokenizer.tokens[{token!r}].source"
    if isinstance(src, str):
        if rows[src][new] < 0:
            raise RecipeError(f"{where}: model {src!r} has no token {token!r}: name a model that has it, "
                              "or use {kind: model_token, model: ..., token: ...}")
        return ((src, rows[src][new]),)
    if src.get("kind") == "zero":
        return ()
    model = str(src["model"])
    if "token_id" in src:
        row = int(src["token_id"])
    else:
        row = tokenizers[model].get_vocab().get(str(src["token"]), -1)
        if row < 0:
            raise RecipeError(f"{where}: model {model!r} has no token {src['token']!r}: check the token")
    if not 0 <= row < vocab_sizes[model]:
        raise RecipeError(f"{where}: token id {row} is outside model {model!r}'s {vocab_sizes[model]} rows")
    return ((model, row),)


class AlignedFetch:
    """Wraps a tensor fetch so vocabulary tensors come back aligned to the output vocabulary.

    Filled rows depend on other models' rows, so they are computed once per tensor name and
    kept (a few rows per added token). Arithmetic in ``dtype`` (the recipe's), as mergekit
    fills rows after casting the inputs.
    """

    def __init__(self, vocab: VocabPlan, fetch: Callable[[str, str], Any], *, dtype: Any = None):
        self._vocab = vocab
        self._fetch = fetch
        self._dtype = dtype
        self._filled: dict[tuple[str, str], dict[int, Any]] = {}
        self._groups: dict[tuple[str, str], tuple[Fill, ...]] = {}
        self._lock = threading.Lock()

    def __call__(self, ref: str, name: str):
        x = self._fetch(ref, name)
        if not is_vocab_tensor(name):
            return x
        return self._align(ref, name, x, group=None)

    def inputs(self, name: str, inputs: Sequence[tuple[str, str]]) -> list:
        """The inputs of output tensor ``name``, aligned. Filled rows come from the same inputs
        (a model that ties its head gives its embedding for the head, and its rows then fill
        the head's missing rows), so they are kept per output tensor."""
        if not is_vocab_tensor(name):
            return [self._fetch(ref, in_name) for ref, in_name in inputs]
        group = dict(inputs)
        return [self._align(ref, in_name, self._fetch(ref, in_name), group=(name, group))
                for ref, in_name in inputs]

    def _fills(self, key: tuple[str, str], names: Mapping[str, str]) -> tuple[Fill, ...]:
        with self._lock:
            if key not in self._groups:
                group = list(names) or [ref for ref, _ in self._vocab.rows]
                self._groups[key] = self._vocab.fills_for(group)
            return self._groups[key]

    def _cast(self, x):
        return x.to(self._dtype) if self._dtype is not None and x.is_floating_point() else x

    def _fill_rows(self, key: tuple[str, str], like, *, names: Mapping[str, str],
                   fills: Sequence[Fill]) -> dict[int, Any]:
        """Rows that replace missing ones, for ``key`` (("output" or "input", tensor name));
        ``names``: the tensor each model gives for it (others give that tensor itself)."""
        import torch

        with self._lock:
            if key in self._filled:
                return self._filled[key]
            cache: dict[str, Any] = {}

            def tensor(ref: str):
                if ref not in cache:
                    cache[ref] = self._cast(self._fetch(ref, names.get(ref, key[1])))
                return cache[ref]

            rows = {}
            for fill in fills:
                if not fill.sources:
                    rows[fill.row] = torch.zeros(like.shape[1:], dtype=like.dtype, device=like.device)
                    continue
                acc = torch.zeros(like.shape[1:], dtype=like.dtype, device=like.device)
                for ref, row in fill.sources:
                    acc = acc + tensor(ref)[row]
                rows[fill.row] = acc / len(fill.sources) if len(fill.sources) > 1 else acc
            self._filled[key] = rows
            return rows

    def _align(self, ref: str, name: str, x, *, group: tuple[str, Mapping[str, str]] | None):
        import torch

        key, names = (("output", group[0]), group[1]) if group is not None else (("input", name), {})
        x = self._cast(x)
        vocab = self._vocab
        index = torch.tensor(vocab.rows_of(ref), dtype=torch.long, device=x.device)   # [tokens]
        present = index >= 0
        out = torch.zeros((vocab.size, *x.shape[1:]), dtype=x.dtype, device=x.device)
        out[: vocab.tokens][present] = x[index[present]]
        fills = self._fills(key, names)
        filled = self._fill_rows(key, x, names=names, fills=fills)
        for fill in fills:
            if fill.force or not bool(present[fill.row]):
                out[fill.row] = filled[fill.row]
        if vocab.size > vocab.tokens:  # padding rows: the mean of the real ones
            out[vocab.tokens:] = out[: vocab.tokens].mean(dim=0)
        return out
