"""Tiny Llama-style models and a byte-level BPE tokenizer, built locally.

Nothing here touches the Hugging Face Hub: tests, perf scripts and examples build
their models from these helpers. Every model is saved the way a hub checkout looks
(config.json with ``architectures``, safetensors weights, tokenizer files).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

# Enough Portuguese to give the BPE merges some shape; byte-level fallback covers the rest.
_CORPUS = [
    "Pergunta: Qual é a capital do Brasil? Alternativas: A. Rio B. Brasília C. Salvador D. Recife",
    "Resposta correta: B",
    "O Código Civil regula os direitos e deveres das pessoas, dos bens e das suas relações.",
    "A Consolidação das Leis do Trabalho garante férias remuneradas ao empregado.",
    "O Sistema Único de Saúde oferece vacinação gratuita em todo o território nacional.",
    "A dengue é transmitida pela picada do mosquito Aedes aegypti infectado.",
    "No ENEM, a prova de ciências da natureza cobra física, química e biologia.",
    "A Constituição Federal de 1988 é a lei fundamental do país.",
] + [f"Questão {i}: A B C D E" for i in range(20)]


def make_tokenizer(out_dir: str | Path, *, vocab_size: int = 384,
                   corpus: Iterable[str] | None = None):
    """Train a byte-level BPE tokenizer on ``corpus`` and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) if corpus is not None else _CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out_dir))
    return fast


def llama_config(*, vocab_size: int = 384, hidden: int = 32, layers: int = 4,
                 heads: int = 4, intermediate: int | None = None, tie: bool = False):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    cfg.architectures = ["LlamaForCausalLM"]  # a bare LlamaConfig leaves this unset
    return cfg


def make_llama(out_dir: str | Path, *, seed: int = 0, config=None,
               like: str | Path | None = None, noise: float = 0.02,
               dtype: torch.dtype = torch.float32, tokenizer_dir: str | Path | None = None,
               max_shard_size: str | None = None):
    """Save a tiny random Llama to ``out_dir``.

    With ``like``, the model is a "fine-tune" of that one: its weights plus seeded
    Gaussian noise of scale ``noise`` (so task vectors are non-trivial and distinct).
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(seed)
    if like is not None:
        model = AutoModelForCausalLM.from_pretrained(str(like), dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * noise)
    else:
        model = LlamaForCausalLM(config or llama_config())
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), **kwargs)
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out_dir))
    return Path(out_dir)
