"""Randomly initialised Llama- and Mistral-shaped checkpoints (a base and "fine-tunes" = base
plus small noise) with Mistral's real SentencePiece tokenizer from mistral-common, written as
a hub checkout looks (config.json, safetensors, tokenizer): for the plan checks, no downloads."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

# name -> (hidden, layers, heads, intermediate); vocab 32000 (the tokenizer's)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "0.1B": (768, 8, 12, 2048),
    "0.25B": (1024, 14, 16, 2816),
    "0.5B": (1280, 20, 20, 3456),
    "7B": (4096, 32, 32, 14336),      # Mistral-7B-v0.1
    "tiny": (64, 2, 4, 128),
}


def config(family: str, size: str):
    """A transformers config: ``mistral`` has 4x fewer KV heads (GQA) and a sliding window."""
    import transformers as tf

    hidden, layers, heads, inter = SIZES[size]
    common = dict(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=32768, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
    if family == "mistral":
        cfg = tf.MistralConfig(num_key_value_heads=max(1, heads // 4), sliding_window=4096, **common)
        cfg.architectures = ["MistralForCausalLM"]
    else:
        cfg = tf.LlamaConfig(num_key_value_heads=heads, **common)
        cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def tokenizer(folder: Path):
    """Mistral's v1 SentencePiece tokenizer (vocab 32000), adding BOS as Mistral does."""
    import mistral_common
    from transformers import LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    return LlamaTokenizer.from_pretrained(str(folder), add_bos_token=True)


def build(root: Path, family: str, size: str, *, n_models: int = 2, dtype: torch.dtype = torch.bfloat16,
          device: str = "cpu", noise: float = 0.002) -> dict[str, Path]:
    """``root/base`` and ``root/ft1..n``; tensors are made on ``device`` (one at a time per model)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    cfg = config(family, size)
    cfg.dtype = str(dtype).removeprefix("torch.")
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    tok = tokenizer(root / "_tokenizer")
    gen = torch.Generator(device=device).manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        t = (torch.ones(shape, device=device) if name.endswith("norm.weight")
             else torch.randn(shape, generator=gen, device=device) * 0.02)
        base[name] = t.to(dtype)
    out = {}
    for i, label in enumerate(["base", *(f"ft{k}" for k in range(1, n_models + 1))]):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        gen.manual_seed(i)
        tensors = base if i == 0 else {
            n: (t.float() + torch.randn(t.shape, generator=gen, device=device) * noise).to(dtype)
            for n, t in base.items()}
        save_file({n: t.contiguous().cpu() for n, t in tensors.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        del tensors
        cfg.save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        out[label] = folder
    return out
