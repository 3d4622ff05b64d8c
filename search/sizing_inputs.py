"""What ``search.sizing`` needs, read from files: no weights are loaded.

- ``model_shape``: a model folder's config.json, and its safetensors headers when there are
  weights (then the exact parameter count, dtype and largest tensor). A folder with only
  config.json (and a tokenizer) is enough: the count then comes from the architecture of a
  Llama / Mistral / Qwen-shaped decoder.
- ``eval_shape``: the campaign's items tokenized and batched by the very evaluator a worker
  builds (``search.scoring``), without a model.
- ``setting``: the campaign's dtype, sources, cache and batch keys.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from merge_core.errors import BrmergeError
from search.campaign import Campaign
from search.sizing import CPU, DTYPE_BYTES, GPUS, EvalShape, ModelShape, Setting

GPU_ENV = "BRMERGE_PLAN_GPU"   # the workers' GPU, when the driver's machine is not one of them


class SizingError(BrmergeError):
    """A model or campaign cannot be sized; the message names the file and the fix."""


def model_dir(ref: str) -> Path:
    """The local folder of ``ref``: a folder path, or a hub id already in the local cache."""
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    from merge_core.sources import resolve_model

    return resolve_model(ref).path


def _config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SizingError(f"cannot read {path / 'config.json'} ({exc}): point at a model folder "
                          "with its config.json") from None
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, Mapping) and "hidden_size" not in config else config


def _header_stats(path: Path) -> tuple[int, int, int, int, str] | None:
    """(params, largest tensor, tensor count, bytes, dominant dtype) from safetensors headers."""
    from merge_core.dtypes import recipe_dtype_of
    from merge_core.sources import read_safetensors_header

    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    params = largest = count = nbytes = 0
    by_dtype: dict[str, int] = {}
    for file in files:
        for name, info in read_safetensors_header(file).items():
            if name == "__metadata__" or not isinstance(info, Mapping):
                continue
            n = 1
            for d in info["shape"]:
                n *= int(d)
            begin, end = info["data_offsets"]
            params, count, nbytes = params + n, count + 1, nbytes + (end - begin)
            largest = max(largest, n)
            dtype = recipe_dtype_of(info["dtype"]) or "float32"
            by_dtype[dtype] = by_dtype.get(dtype, 0) + (end - begin)
    return params, largest, count, nbytes, max(by_dtype, key=by_dtype.__getitem__)


def shape_from_config(config: Mapping[str, Any], *, checkpoint_dtype: str | None = None) -> ModelShape:
    """The shape of a Llama / Mistral / Qwen-shaped decoder from its config alone."""
    try:
        vocab, hidden = int(config["vocab_size"]), int(config["hidden_size"])
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        inter = int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SizingError(f"config.json lacks {exc} for a decoder shape (vocab_size, hidden_size, "
                          "num_hidden_layers, num_attention_heads, intermediate_size): add it, or "
                          "ship the safetensors weights") from None
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    tied = bool(config.get("tie_word_embeddings", False))
    model_type = str(config.get("model_type", ""))
    q, k = heads * head_dim, kv * head_dim
    attn = hidden * q + 2 * hidden * k + q * hidden
    if config.get("attention_bias") or model_type == "qwen2":
        attn += q + 2 * k + (hidden if config.get("attention_bias") else 0)
    if model_type.startswith("qwen3"):
        attn += 2 * head_dim                              # q_norm, k_norm
    mlp = 3 * hidden * inter + ((2 * inter + hidden) if config.get("mlp_bias") else 0)
    per_layer = attn + mlp + 2 * hidden                   # two RMSNorms
    embed = vocab * hidden
    head = 0 if tied else vocab * hidden
    per_layer_tensors = 9 + (3 if model_type == "qwen2" or config.get("attention_bias") else 0)
    dtype = checkpoint_dtype or str(config.get("torch_dtype") or config.get("dtype") or "float32")
    if dtype not in DTYPE_BYTES:
        dtype = "float32"
    return ModelShape(params=embed + head + layers * per_layer + hidden, embed_params=embed,
                      head_params=head, layers=layers, hidden=hidden, heads=heads, kv_heads=kv,
                      head_dim=head_dim, intermediate=inter, vocab=vocab,
                      largest_tensor=max(embed, hidden * inter, hidden * q),
                      n_tensors=layers * per_layer_tensors + 2 + (0 if tied else 1),
                      checkpoint_dtype=dtype)


def model_shape(path: Path) -> ModelShape:
    config = _config(path)
    shape = shape_from_config(config)
    stats = _header_stats(path)
    if stats is None:
        return shape
    params, largest, count, _, dtype = stats
    tied = bool(config.get("tie_word_embeddings", False))
    return ModelShape(**{**shape.__dict__, "params": params, "largest_tensor": largest,
                         "n_tensors": count, "checkpoint_dtype": dtype,
                         "head_params": 0 if tied else shape.head_params})


def _stub_model(config: Mapping[str, Any]) -> Any:
    """What the evaluator reads of a model to batch (its config), without weights."""
    from transformers import AutoConfig

    return SimpleNamespace(config=AutoConfig.for_model(**dict(config)))


def eval_shape(campaign: Campaign, path: Path, config: Mapping[str, Any] | None = None) -> EvalShape:
    """The forwards of one full evaluation, batched as the worker's evaluator batches them."""
    import torch
    from transformers import AutoTokenizer

    from evals.harness import resolve_max_length
    from search import scoring

    config = config or _config(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise SizingError(f"cannot load the tokenizer of {path} ({str(exc).splitlines()[0]}): the "
                          "plan tokenizes the campaign's items; save the tokenizer in the model folder") from None
    full, _ = scoring.stage_evaluators(campaign, tokenizer)
    stub = _stub_model(config)
    max_length = full.max_length or resolve_max_length(stub, tokenizer)
    groups = full._build_groups(stub, torch.device("cpu"), max_length)
    prefixes, batches = [], []
    for g in groups:
        p = 0 if g.prefix is None else int(g.prefix.shape[1])
        prefixes.append(p)
        batches += [(int(b.input_ids.shape[0]), p, int(b.input_ids.shape[1])) for b in g.batches]
    return EvalShape(prefixes=tuple(prefixes), batches=tuple(batches), items=len(full.requests))


def _raw(campaign: Campaign, section: str, key: str) -> Any:
    sub = campaign.raw.get(section) if isinstance(campaign.raw, Mapping) else None
    return sub.get(key) if isinstance(sub, Mapping) else None


def setting(campaign: Campaign, model: ModelShape, *, gpu: str) -> Setting:
    """The campaign's ``eval.dtype`` (``auto``: the checkpoint's on a GPU, float32 on CPU),
    ``workers.sources`` (``auto``: decided by the plan), ``workers.magnitude_cache`` and
    ``eval.max_batch_tokens``."""
    dtype = str(getattr(campaign, "dtype", None) or _raw(campaign, "eval", "dtype") or "auto")
    if dtype == "auto":
        ck = model.checkpoint_dtype
        dtype = ck if gpu != CPU and ck in ("bfloat16", "float16") else "float32"
    sources = str(getattr(campaign, "sources", None) or _raw(campaign, "workers", "sources") or "device")
    cache = getattr(campaign, "magnitude_cache", None) or _raw(campaign, "workers", "magnitude_cache") or "auto"
    if isinstance(cache, str) and cache not in ("auto", "off"):
        from merge_core.io import parse_size

        cache = 0 if cache.strip() == "0" else parse_size(cache)
    tokens = getattr(campaign, "max_batch_tokens", None) or _raw(campaign, "eval", "max_batch_tokens")
    return Setting(dtype=dtype, sources=sources, cache=cache, max_batch_tokens=tokens)


def local_device() -> tuple[str, float | None]:
    """(GPU kind, its memory in GiB) of the workers: ``$BRMERGE_PLAN_GPU`` (a kind of
    ``sizing.GPUS``, or GiB), else this machine's first CUDA device, else ``cpu``."""
    env = os.environ.get(GPU_ENV, "").strip()
    if env:
        if env in GPUS or env == CPU:
            return env, None
        try:
            return "H100-80GB", float(env)   # a size only: the fastest table entry's rates
        except ValueError:
            raise SizingError(f"{GPU_ENV}={env!r}: give one of {', '.join([*GPUS, CPU])}, or the "
                              "workers' GPU memory in GiB") from None
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gib = props.total_memory / 1024 ** 3
            kind = min(GPUS, key=lambda k: abs(GPUS[k][0] - gib))
            return kind, gib
    except Exception:  # noqa: BLE001 - a broken CUDA setup: plan as CPU, the worker will say more
        pass
    return CPU, None


def host_memory() -> int:
    """Bytes of RAM on this machine (MemTotal)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
