"""The output's config.json: the reference model's config, rewritten for the merged layers.

A stack of layer slices changes the depth, and configs that describe each layer (Gemma 2/3's
and Qwen3's ``layer_types``, ``no_rope_layers``...) must describe the new stack, or
``from_pretrained`` refuses the model. Every per-layer list is rebuilt from the config of the
model each output layer came from; lists of layer indices (``mlp_only_layers``) are remapped.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
# Lists of layer *indices* (not one entry per layer): remapped to the output's indices.
_INDEX_LISTS = ("mlp_only_layers",)


def layer_count_key(config: Mapping[str, Any]) -> str:
    return next((k for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)), "num_hidden_layers")


def stacked_config(config: Mapping[str, Any], *, num_layers: int,
                   layer_sources: Sequence[tuple[Mapping[str, Any], int]],
                   vocab_size: int | None = None) -> dict[str, Any]:
    """``config`` for a model of ``num_layers`` layers where output layer ``i`` is layer
    ``layer_sources[i][1]`` of the model whose config is ``layer_sources[i][0]``.

    With no ``layer_sources`` (a merge that keeps the depth) only the count is set.
    ``vocab_size``: the output vocabulary's rows, when embeddings were aligned by token.
    """
    out = copy.deepcopy(dict(config))
    # A multimodal wrapper keeps the language model's settings in text_config.
    nested = layer_count_key(out) not in out and isinstance(out.get("text_config"), dict)
    text = out["text_config"] if nested else out
    if vocab_size is not None:
        (out if "vocab_size" in out else text)["vocab_size"] = vocab_size
    key = layer_count_key(text)
    depth = text.get(key)
    text[key] = num_layers
    if not layer_sources:
        return out
    layer_sources = [(_text(src), layer) for src, layer in layer_sources]
    for name, value in list(text.items()):
        if not isinstance(value, list) or not value or isinstance(depth, bool):
            continue
        if name in _INDEX_LISTS:
            text[name] = [i for i, (src, layer) in enumerate(layer_sources)
                          if layer in (src.get(name) or ())]
        elif isinstance(depth, int) and len(value) == depth and name != "architectures":
            text[name] = [_entry(src, name, layer, fallback=value) for src, layer in layer_sources]
    return out


def _text(config: Mapping[str, Any]) -> Mapping[str, Any]:
    if not any(k in config for k in LAYER_COUNT_KEYS) and isinstance(config.get("text_config"), Mapping):
        return config["text_config"]
    return config


def _entry(src: Mapping[str, Any], name: str, layer: int, *, fallback: list) -> Any:
    values = src.get(name)
    if isinstance(values, list) and layer < len(values):
        return values[layer]
    return fallback[layer % len(fallback)]
