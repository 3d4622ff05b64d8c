"""LoRA adapters applied on read: a ``base+adapter`` source reads as the merged model.

What PEFT's ``merge_and_unload`` computes, without loading PEFT or building a module: each
adapted weight becomes ``W + scale * B @ A`` (transposed for ``fan_in_fan_out`` layers and
for embeddings, whose A and B are stored the other way round), ``scale = lora_alpha / r``
(``/ sqrt(r)`` with ``use_rslora``; ``rank_pattern``/``alpha_pattern`` override r and alpha
per module), a LoRA bias adds ``scale * lora_B.bias``; tensors the adapter saved whole
(``modules_to_save``, embedding ``base_layer`` weights) replace the base's. The delta is
computed in float32 and added in the weight's dtype, as PEFT does on a CPU.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_core.errors import MergeError
from merge_core.io import SafetensorsFile, TensorReader
from merge_core.sources import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ModelSource

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraDelta:
    a: str                  # adapter tensor names
    b: str
    scale: float
    transpose: bool         # fan_in_fan_out layers and embeddings: the delta is (B @ A).T
    bias: str | None = None  # lora_B.bias, added to the module's bias


def open_reader(source: ModelSource, *, pickle_ok: bool = False) -> TensorReader:
    """The tensors of ``source``, its adapter applied when it has one."""
    if source.adapter is None:
        return TensorReader(source.weight_files, pickle_ok=pickle_ok)
    return AdaptedReader(source.weight_files, adapter=source.adapter, pickle_ok=pickle_ok)


class AdaptedReader(TensorReader):
    """A base model's tensors with a LoRA adapter merged into them as they are read."""

    def __init__(self, files: Sequence[str | Path], *, adapter: Path, pickle_ok: bool = False):
        super().__init__(files, pickle_ok=pickle_ok)
        self._adapter = SafetensorsFile(adapter / ADAPTER_WEIGHTS)
        config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        self._deltas, self._replaced = _layout(list(self._adapter.entries), config, where=str(adapter))
        for name in [*self._deltas, *self._replaced]:
            if name not in self:
                raise MergeError(f"adapter {adapter} changes tensor '{name}', which its base model lacks: "
                                 "is this adapter for that base?")

    def get(self, name: str, *, device: torch.device | str = "cpu",
            dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self._replaced:
            x = self._adapter.get(self._replaced[name], device=device)
        else:
            x = super().get(name, device=device)
        delta = self._deltas.get(name)
        if delta is not None:
            x = x + self._delta(delta, device=device, like=x)
        return x if dtype is None else x.to(dtype)

    def _delta(self, d: LoraDelta, *, device: torch.device | str, like: torch.Tensor) -> torch.Tensor:
        if d.bias is not None and like.dim() == 1:
            return (self._adapter.get(d.bias, device=device).float() * d.scale).to(like.dtype)
        a = self._adapter.get(d.a, device=device).float()                       # [r, in]
        b = self._adapter.get(d.b, device=device).float()                       # [out, r]
        w = b @ a
        if d.transpose:
            w = w.T
        return (w * d.scale).to(like.dtype)

    def close(self) -> None:
        self._adapter.close()
        super().close()


def _layout(keys: list[str], config: dict, *, where: str) -> tuple[dict[str, LoraDelta], dict[str, str]]:
    """Base tensor name -> its delta, and base tensor name -> the adapter tensor replacing it."""
    deltas: dict[str, LoraDelta] = {}
    replaced: dict[str, str] = {}
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for key in keys:
        if not key.startswith(_PREFIX):
            raise MergeError(f"adapter {where}: tensor '{key}' is not a PEFT adapter tensor: re-save the "
                             "adapter with PEFT")
        name = key[len(_PREFIX):]
        if "lora_magnitude_vector" in name:
            raise MergeError(f"adapter {where} holds DoRA magnitudes: merge it with PEFT's merge_and_unload")
        m = re.fullmatch(r"(.+)\.lora_A\.weight|(.+)\.lora_embedding_A", name)
        if m:
            module = m.group(1) or m.group(2)
            embedding = m.group(2) is not None
            b = f"{_PREFIX}{module}.lora_embedding_B" if embedding else f"{_PREFIX}{module}.lora_B.weight"
            if b not in keys:
                raise MergeError(f"adapter {where}: '{key}' has no matching B matrix: re-save the adapter")
            scale = _scale(module, config)
            deltas[f"{module}.weight"] = LoraDelta(a=key, b=b, scale=scale,
                                                   transpose=embedding or fan_in_fan_out)
            if f"{_PREFIX}{module}.lora_B.bias" in keys:
                deltas[f"{module}.bias"] = LoraDelta(a=key, b=b, scale=scale, transpose=False,
                                                     bias=f"{_PREFIX}{module}.lora_B.bias")
        elif re.search(r"\.lora_(B|embedding_B)(\.weight|\.bias)?$", name):
            continue                               # taken with its A
        elif ".lora_" in name:
            raise MergeError(f"adapter {where}: tensor '{key}' is of a LoRA variant brmerge does not "
                             "apply: merge it with PEFT's merge_and_unload first")
        else:                                      # saved whole: modules_to_save, base_layer weights
            replaced[name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")] = key
    return deltas, replaced


def _scale(module: str, config: dict) -> float:
    r = _pattern(module, config.get("rank_pattern") or {}, config.get("r", 8))
    alpha = _pattern(module, config.get("alpha_pattern") or {}, config.get("lora_alpha", 8))
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else float(r))


def _pattern(module: str, patterns: dict, default: float) -> float:
    # PEFT matches a pattern key against the end of the module's name.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default
