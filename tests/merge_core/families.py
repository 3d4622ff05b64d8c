"""Tiny models of every family brmerge merges, built locally (no Hub).

``make_family(name, root)`` saves a base and fine-tunes of it (seeded noise) under ``root``
and returns their folders. Each config is the family's own transformers config with small
sizes, so the saved tensor names and config keys are exactly the family's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Common small sizes: 4 layers so gradients and 3-layer slices are meaningful.
_SMALL = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=0, eos_token_id=1, pad_token_id=2)


def family_config(name: str, *, tie: bool | None = None) -> Any:
    import transformers as tf

    small = dict(_SMALL)
    if name == "llama":
        cfg = tf.LlamaConfig(**small, tie_word_embeddings=bool(tie))
    elif name == "mistral":
        cfg = tf.MistralConfig(**small, tie_word_embeddings=bool(tie))
    elif name == "qwen3":
        cfg = tf.Qwen3Config(**small, head_dim=8, tie_word_embeddings=bool(tie))
    elif name == "phi3":
        cfg = tf.Phi3Config(**small, tie_word_embeddings=bool(tie))
    elif name == "gemma":
        cfg = tf.GemmaConfig(**small, head_dim=8, tie_word_embeddings=True if tie is None else tie)
    elif name == "gemma2":
        cfg = tf.Gemma2Config(**small, head_dim=8, sliding_window=16,
                              tie_word_embeddings=True if tie is None else tie)
    elif name == "gemma3_text":
        cfg = tf.Gemma3TextConfig(**small, head_dim=8, sliding_window=16,
                                  tie_word_embeddings=True if tie is None else tie)
    elif name == "mixtral":
        cfg = tf.MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2,
                               tie_word_embeddings=bool(tie))
    elif name == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**small, head_dim=8, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=16, decoder_sparse_step=1,
                                tie_word_embeddings=bool(tie))
    elif name == "gemma3_mm":   # Gemma 3 4B+ layout: a SigLIP vision tower, a projector, the text model
        text = dict(small, head_dim=8, sliding_window=16)
        text.pop("pad_token_id")
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      image_size=32, patch_size=8, vision_use_head=False)
        cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                              boi_token_index=3, eoi_token_index=4, image_token_index=5)
    elif name == "gpt2":
        cfg = tf.GPT2Config(vocab_size=384, n_embd=32, n_layer=4, n_head=4, n_positions=256,
                            bos_token_id=0, eos_token_id=1, tie_word_embeddings=True if tie is None else tie)
    else:
        raise KeyError(name)
    cfg.architectures = [_ARCH[name]]
    return cfg


_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "phi3": "Phi3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
         "gemma3_text": "Gemma3ForCausalLM", "mixtral": "MixtralForCausalLM",
         "qwen3_moe": "Qwen3MoeForCausalLM", "gpt2": "GPT2LMHeadModel",
         "gemma3_mm": "Gemma3ForConditionalGeneration"}
MULTIMODAL = ("gemma3_mm",)
FAMILIES = tuple(f for f in _ARCH if f not in MULTIMODAL)   # causal LMs
DENSE = tuple(f for f in FAMILIES if f not in ("mixtral", "qwen3_moe"))
MOE = ("mixtral", "qwen3_moe")


def _save(model, out: Path, tokenizer_dir: Path | None) -> Path:
    model.save_pretrained(str(out))
    if type(model).__name__ == "Gemma3ForConditionalGeneration":
        _hub_layout(out)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out


def _hub_layout(out: Path) -> None:
    """Gemma 3 checkpoints on the Hub name the vision tower's tensors vision_tower.vision_model.*
    (transformers loads both spellings; mergekit reads only the Hub's)."""
    from safetensors.torch import load_file, save_file

    state = load_file(out / "model.safetensors")
    state = {("vision_tower.vision_model." + k[len("vision_tower."):]
              if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.") else k): v
             for k, v in state.items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})


def make_family(name: str, root: Path, *, tokenizer_dir: Path | None, fine_tunes: int = 2,
                tie: bool | None = None, noise: float = 0.02) -> dict[str, Path]:
    """A base (``base``) and ``fine_tunes`` noisy copies (``ft_a``, ``ft_b``, ...)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if name in MULTIMODAL else AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_config(family_config(name, tie=tie), dtype=torch.float32)
    with torch.no_grad():  # some families initialise norms to 0 or 1 exactly: give them texture
        gen = torch.Generator().manual_seed(100)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    out = {"base": _save(model, root / f"{name}-base", tokenizer_dir)}
    for i in range(fine_tunes):
        ft = auto.from_pretrained(str(out["base"]), dtype=torch.float32)
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
        key = "ft_" + "abcdefgh"[i]
        out[key] = _save(ft, root / f"{name}-{key}", tokenizer_dir)
    return out
