"""Compatibility of merge sources, checked before any tensor is read.

Everything here works from config.json, tokenizer.json and safetensors headers, so a bad recipe
fails in milliseconds with one line naming the model, the tensor and the fix, instead of halfway
through a multi-gigabyte merge. Numeric dtypes may differ: the merge casts.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_core.dtypes import to_safetensors
from merge_core.errors import BrmergeError
from merge_core.plan import tied_input
from merge_core.sources import ModelSource, SourceError, read_safetensors_header


class IncompatibleModelsError(BrmergeError):
    """Sources that cannot be merged together; one line naming the model, tensor and fix."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # as safetensors spells it: "F32", "BF16", "F16", ...


# Tensors whose first dimension is the vocabulary: a size difference there is reported as a
# vocabulary mismatch, which says more than "different shape".
_VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "word_embeddings.weight",
                  "embed_out.weight", "tok_embeddings.weight", "output.weight")

_FIX_FAMILY = "merge fine-tunes of one base model"
_FIX_LAYERS = ("merge fine-tunes of one base model, or stack layers with `slices` and "
               "merge_method passthrough")
_FIX_VOCAB = ("set tokenizer_source (base, union or a model) to align embedding rows by token, "
              "or merge models with the same vocabulary")
_FIX_TOKENIZER = ("set `tokenizer_source` in the recipe to choose the output tokenizer, or merge "
                  "models that share a tokenizer")


def read_tensor_infos(source: ModelSource) -> dict[str, TensorInfo]:
    """Tensor name -> shape and dtype, from safetensors headers only (no tensor data read)."""
    infos: dict[str, TensorInfo] = {}
    for file in source.weight_files:
        if source.format == "safetensors":
            header = read_safetensors_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                try:
                    infos[name] = TensorInfo(shape=tuple(int(d) for d in meta["shape"]),
                                             dtype=str(meta["dtype"]))
                except (KeyError, TypeError, ValueError) as e:
                    raise SourceError(f"model '{source.ref}': {file.name} has a malformed entry "
                                      f"for tensor '{name}': re-download or re-save it") from e
        else:
            infos.update(_pickle_infos(file, ref=source.ref))
    return infos


def check_compatible(sources: Sequence[ModelSource], *,
                     infos: Mapping[str, Mapping[str, TensorInfo]] | None = None,
                     same_layers: bool = True, tokenizer_source: str | None = None,
                     align_vocab: bool = False) -> None:
    """Raise IncompatibleModelsError at the first reason ``sources`` cannot be merged.

    ``sources[0]`` is the reference (the base model, or the first model). ``infos`` maps a
    source's ``ref`` to its tensor infos when the caller has them already. With
    ``same_layers=False`` (layer stacking) tensor sets may differ; shapes of shared names may not.
    """
    if len(sources) < 2:
        return
    ref, others = sources[0], sources[1:]
    known = dict(infos or {})
    ref_infos = known.get(ref.ref) or read_tensor_infos(ref)
    other_infos = [known.get(s.ref) or read_tensor_infos(s) for s in others]

    for src in others:
        _check_architecture(ref, src)
    if same_layers:
        for src, src_infos in zip(others, other_infos):
            _check_names(ref, ref_infos, src, src_infos)
    for src, src_infos in zip(others, other_infos):
        _check_shapes(ref, ref_infos, src, src_infos)
    if align_vocab:  # rows are matched by token string (merge_core.vocab): sizes and ids may differ
        return
    for src, src_infos in zip(others, other_infos):
        _check_vocab(ref, ref_infos, src, src_infos)
    for src in others:
        _check_tokenizer(ref, src, tokenizer_source=tokenizer_source)


def _label(src: ModelSource) -> str:
    return f"'{src.ref}' (the reference model)"


def _check_architecture(ref: ModelSource, src: ModelSource) -> None:
    want = (ref.config.get("architectures"), ref.config.get("model_type"))
    got = (src.config.get("architectures"), src.config.get("model_type"))
    if want != got:
        raise IncompatibleModelsError(
            f"model '{src.ref}' is {got[0]} (model_type {got[1]!r}) but {_label(ref)} is "
            f"{want[0]} (model_type {want[1]!r}): {_FIX_FAMILY}")


def _check_names(ref: ModelSource, ref_infos: Mapping[str, TensorInfo], src: ModelSource,
                 src_infos: Mapping[str, TensorInfo]) -> None:
    # A head one side saved and the other ties to its embedding is merged as mergekit does.
    missing = sorted(n for n in ref_infos.keys() - src_infos.keys() if tied_input(n, src_infos) is None)
    extra = sorted(n for n in src_infos.keys() - ref_infos.keys() if tied_input(n, ref_infos) is None)
    if not missing and not extra:
        return
    others = len(missing) + len(extra) - 1
    more = f" ({others} other tensor(s) differ too)" if others else ""
    if missing:
        what = f"model '{src.ref}' lacks tensor '{missing[0]}' that {_label(ref)} has"
    else:
        what = f"model '{src.ref}' has tensor '{extra[0]}' that {_label(ref)} lacks"
    raise IncompatibleModelsError(f"{what}{more}: {_FIX_LAYERS}")


def _check_shapes(ref: ModelSource, ref_infos: Mapping[str, TensorInfo], src: ModelSource,
                  src_infos: Mapping[str, TensorInfo]) -> None:
    for name in sorted(ref_infos.keys() & src_infos.keys()):
        a, b = ref_infos[name].shape, src_infos[name].shape
        if a == b or (_is_vocab_tensor(name) and len(a) == len(b) and a[1:] == b[1:]):
            continue  # a vocabulary-only difference is reported by _check_vocab, with its fix
        raise IncompatibleModelsError(
            f"model '{src.ref}' tensor '{name}' has shape {list(b)} but {_label(ref)} has "
            f"{list(a)}: {_FIX_FAMILY} (same hidden size and layer shapes)")


def _check_vocab(ref: ModelSource, ref_infos: Mapping[str, TensorInfo], src: ModelSource,
                 src_infos: Mapping[str, TensorInfo]) -> None:
    # Embedding rows are merged row by row (no remapping), so every source needs as many.
    problem = None
    a, b = ref.config.get("vocab_size"), src.config.get("vocab_size")
    if a != b:
        problem = f"model '{src.ref}' has vocab_size {b} but {_label(ref)} has {a}"
    else:
        for name in sorted(ref_infos.keys() & src_infos.keys()):
            if not _is_vocab_tensor(name):
                continue
            rows_a, rows_b = ref_infos[name].shape[:1], src_infos[name].shape[:1]
            if rows_a != rows_b:
                problem = (f"model '{src.ref}' tensor '{name}' has {rows_b[0]} vocabulary rows "
                           f"but {_label(ref)} has {rows_a[0]}")
                break
    if problem is None:
        return
    raise IncompatibleModelsError(f"{problem}: {_FIX_VOCAB}")


def _check_tokenizer(ref: ModelSource, src: ModelSource, *, tokenizer_source: str | None) -> None:
    vocab_a = _tokenizer_vocab(ref.path / "tokenizer.json", ref=ref.ref)
    vocab_b = _tokenizer_vocab(src.path / "tokenizer.json", ref=src.ref)
    if vocab_a is None or vocab_b is None or vocab_a == vocab_b:
        return
    diff = sorted(t for t in vocab_a.keys() | vocab_b.keys() if vocab_a.get(t) != vocab_b.get(t))
    token = diff[0]
    if token not in vocab_b:
        detail = f"its tokenizer.json lacks token {token!r}, id {vocab_a[token]} in the reference"
    elif token not in vocab_a:
        detail = f"its tokenizer.json has token {token!r} (id {vocab_b[token]}) the reference lacks"
    else:
        detail = (f"its tokenizer.json gives token {token!r} id {vocab_b[token]}, "
                  f"the reference id {vocab_a[token]}")
    more = f"; {len(diff) - 1} other token(s) differ too" if len(diff) > 1 else ""
    problem = f"model '{src.ref}' has a different tokenizer from {_label(ref)} ({detail}{more})"
    if tokenizer_source is not None:
        warnings.warn(f"{problem}; the output uses tokenizer_source {tokenizer_source!r}",
                      stacklevel=3)
        return
    raise IncompatibleModelsError(f"{problem}: {_FIX_TOKENIZER}")


def _tokenizer_vocab(path: Path, *, ref: str) -> dict[str, int] | None:
    """Token -> id from a fast tokenizer's tokenizer.json (model vocab plus added tokens)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SourceError(f"model '{ref}': {path} is unreadable ({e}): re-download it") from e
    vocab_raw: Any = (data.get("model") or {}).get("vocab") or {}
    if isinstance(vocab_raw, list):  # Unigram stores [token, score] pairs; the id is the position
        vocab = {str(entry[0]): i for i, entry in enumerate(vocab_raw)}
    else:
        vocab = {str(k): int(v) for k, v in vocab_raw.items()}
    for added in data.get("added_tokens") or []:
        vocab[str(added["content"])] = int(added["id"])
    return vocab


def _is_vocab_tensor(name: str) -> bool:
    return name.endswith(_VOCAB_TENSORS)


def _pickle_infos(file: Path, *, ref: str) -> dict[str, TensorInfo]:
    import torch

    try:
        # mmap + weights_only: only the pickle's structure is read and no code can run.
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises several unrelated types for unreadable checkpoints
        raise SourceError(f"model '{ref}': cannot read {file.name} as plain tensors ({e}): "
                          "convert the checkpoint to safetensors") from e
    return {k: TensorInfo(shape=tuple(v.shape), dtype=to_safetensors(v.dtype))
            for k, v in state.items() if isinstance(v, torch.Tensor)}
