"""The demo's model zoo: a tiny Llama-style base and two specialists, trained on the CPU.

- The base learns Portuguese from ``CORPUS`` (prose written for this project on law, health
  and ENEM topics) and the multiple-choice format from the ``sample`` questions, each shown
  with a fresh random answer letter: it learns the format, never the answers.
- Each specialist is fine-tuned from the base on the dev items of its domain with their
  answers (test items stay held out), in the zero-shot prompt form the demo scores. The loss
  covers the whole sequence (questions and options too: with the letter alone both task vectors
  point the same way and no merge beats the equal-weight one), the answer letter weighted more
  (one token in ~140, it was otherwise not learned in a CPU budget). The specialists memorize
  those items: the demo shows the merge search, not a model that generalizes.

The zoo is cached under ``cache_dir/<digest of the recipe and its data>`` and built at most
once; a build is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import math
import os
import random
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks_ptbr.items import Item
from benchmarks_ptbr.prompts import (
    DESCRIPTIONS,
    FEWSHOT_DELIMITER,
    TARGET_DELIMITER,
    format_query,
)
from benchmarks_ptbr.sources import load_sample

if TYPE_CHECKING:  # torch loads in seconds: only when a zoo is actually trained
    import torch

CACHE_ENV = "BRMERGE_CACHE_DIR"
SPECIALISTS = ("legal", "health")      # one fine-tune per domain, in this order
FORMAT_DOMAINS = ("legal", "health", "enem")  # questions the base sees with random letters
MODEL_NAMES = {"base": "ptbr-tiny-base", "legal": "ptbr-tiny-legal", "health": "ptbr-tiny-health"}

# Written for brmerge (not taken from any exam): general prose, so the base learns the language.
# Package data (``corpus.json``) so the text can be read and edited apart from the code.
CORPUS: tuple[str, ...] = tuple(json.loads(
    (importlib.resources.files(__package__) / "corpus.json").read_text(encoding="utf-8")))


@dataclass(frozen=True)
class ZooRecipe:
    """Everything the zoo depends on; its digest names the cache folder."""

    seed: int = 0
    vocab_size: int = 1024       # ~120 tokens a question: short sequences are what a CPU can afford
    hidden: int = 64             # 128 trains too slowly for a demo on a 2-core CPU
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    context: int = 2048          # room for 3-shot prompts (~500 tokens) too, not only the demo's 0-shot
    base_steps: int = 100
    base_lr: float = 3e-3
    base_batch: int = 8
    specialist_steps: int = 100
    specialist_lr: float = 3e-3
    specialist_batch: int = 4    # small batches: more updates for the same compute
    answer_weight: float = 10.0  # the answer letter is 1 token in ~140: weight it in the loss
    base_items: int = 2          # base exam texts: description + 1..base_items questions
    specialist_items: int = 1    # specialist texts: description + this many answered questions
    prose_fraction: float = 0.3  # share of base texts that are prose rather than questions
    threads: int = 1             # one thread: the demo's two workers already keep 2 cores busy
    version: int = 1             # bump when the training code changes what it produces

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        h.update("\n".join(CORPUS).encode())
        for domain in FORMAT_DOMAINS:  # the questions are training data too
            for split, items in sorted(load_sample(domain).items.items()):
                for item in items:
                    h.update(f"{split}|{item.id}|{item.question}|{item.texts}|{item.answer}".encode())
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class Zoo:
    root: Path
    base: Path
    specialists: dict[str, Path]   # domain -> model folder
    built: bool                    # False when it came from the cache


def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "brmerge"


# -- training text ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    text: str
    answers: tuple[int, ...] = ()   # character offsets of the answer letters in ``text``


def _exam_example(domain: str, items: Sequence[Item], rng: random.Random, *, answered: bool) -> Example:
    """A prompt-shaped text: the domain's description, then questions with a letter each.

    ``answered=False`` draws a fresh random letter every time, so the format is learned but no
    answer is; ``answered=True`` gives the real answers (specialists only).
    """
    text, answers = DESCRIPTIONS[domain], []
    for item in items:
        text += format_query(item, domain) + TARGET_DELIMITER
        answers.append(len(text))
        text += (item.answer if answered else rng.choice(item.labels)) + FEWSHOT_DELIMITER
    return Example(text, tuple(answers))


def _all_items(domain: str) -> list[Item]:
    loaded = load_sample(domain)
    return [i for split in sorted(loaded.items) for i in loaded.items[split]]


def _dev_items(domain: str) -> list[Item]:
    return list(load_sample(domain).items["dev"])


def tokenizer_corpus() -> list[str]:
    rng = random.Random(0)
    texts = list(CORPUS)
    for domain in FORMAT_DOMAINS:
        texts += [_exam_example(domain, [i], rng, answered=False).text for i in _all_items(domain)]
    return texts


def base_examples(recipe: ZooRecipe, rng: random.Random) -> Iterator[Example]:
    """Endless base-training texts: prose, or questions of one domain with random letters."""
    pools = {d: _all_items(d) for d in FORMAT_DOMAINS}
    while True:
        if rng.random() < recipe.prose_fraction:
            start = rng.randrange(len(CORPUS))
            yield Example("\n\n".join(CORPUS[start:start + 2]))
        else:
            domain = rng.choice(FORMAT_DOMAINS)
            k = rng.randint(1, recipe.base_items)
            # random letters carry no signal: no extra weight on them
            yield Example(_exam_example(domain, rng.sample(pools[domain], k), rng, answered=False).text)


def specialist_examples(recipe: ZooRecipe, domain: str, rng: random.Random) -> Iterator[Example]:
    """Endless fine-tuning texts: the domain's dev items, answered, in random order."""
    pool = _dev_items(domain)
    while True:
        yield _exam_example(domain, rng.sample(pool, recipe.specialist_items), rng, answered=True)


# -- training ---------------------------------------------------------------------------------

def _batch(tokenizer, examples: list[Example], *, context: int, answer_weight: float) -> dict[str, torch.Tensor]:

    enc = tokenizer([e.text for e in examples], padding=True, truncation=True, max_length=context,
                    return_tensors="pt", return_offsets_mapping=True)
    mask = enc["attention_mask"]                        # [B, T]
    weights = mask.float()                              # [B, T]: every real token counts...
    spans = enc["offset_mapping"]                       # [B, T, 2] character span of each token
    for row, example in enumerate(examples):
        for pos in example.answers:                     # ...and the answer letters count more
            hit = (spans[row, :, 0] <= pos) & (spans[row, :, 1] > pos) & (mask[row] == 1)
            weights[row, hit] = answer_weight
    return {"input_ids": enc["input_ids"], "attention_mask": mask, "weights": weights}


def _weighted_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    logp = logits[:, :-1].float().log_softmax(-1)                                          # [B, T-1, V]
    nll = -logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)                   # [B, T-1]
    w = batch["weights"][:, 1:]                                                            # [B, T-1]
    return (nll * w).sum() / w.sum()


def train(model: torch.nn.Module, tokenizer, examples: Iterator[Example], *, steps: int, lr: float,
          batch: int, context: int, answer_weight: float = 1.0,
          on_step: Callable[[float], None] | None = None) -> float:
    """AdamW with a short warm-up and cosine decay; the loss covers every token of a sequence
    (answer letters weighted ``answer_weight``)."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        return min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    loss_value = float("nan")
    for _ in range(steps):
        inputs = _batch(tokenizer, [next(examples) for _ in range(batch)], context=context,
                        answer_weight=answer_weight)
        loss = _weighted_loss(model, inputs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
        if on_step is not None:
            on_step(loss_value)
    model.eval()
    return loss_value


def _config(recipe: ZooRecipe, tokenizer):
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads, max_position_embeddings=recipe.context,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    cfg.architectures = ["LlamaForCausalLM"]  # a bare LlamaConfig leaves this unset
    return cfg


def _save(model: torch.nn.Module, tokenizer, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def progress_bar(total: int, desc: str, enabled: bool, *, unit: str = "step"):
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False)


def _train_with_bar(model, tokenizer, examples: Iterator[Example], *, steps: int, lr: float, batch: int,
                    answer_weight: float, context: int, desc: str, progress: bool) -> float:
    bar = progress_bar(steps, desc, progress)

    def tick(loss: float) -> None:
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(1)

    try:
        return train(model, tokenizer, examples, steps=steps, lr=lr, batch=batch, context=context,
                     answer_weight=answer_weight, on_step=tick)
    finally:
        bar.close()


def build_zoo(recipe: ZooRecipe, folder: Path, *, progress: bool = True,
              log: Callable[[str], None] = print) -> dict[str, float]:
    """Train the tokenizer, the base and the specialists into ``folder``; returns final losses."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        return _build(recipe, folder, progress=progress, log=log)
    finally:
        torch.set_num_threads(threads)


def _build(recipe: ZooRecipe, folder: Path, *, progress: bool, log: Callable[[str], None]) -> dict[str, float]:
    import copy

    import torch
    from transformers import LlamaForCausalLM

    from search.demo.tiny import make_tokenizer

    torch.manual_seed(recipe.seed)
    tokenizer = make_tokenizer(folder / "tokenizer", vocab_size=recipe.vocab_size,
                               corpus=tokenizer_corpus())
    base = LlamaForCausalLM(_config(recipe, tokenizer))
    losses = {"base": _train_with_bar(
        base, tokenizer, base_examples(recipe, random.Random(recipe.seed)), steps=recipe.base_steps,
        lr=recipe.base_lr, batch=recipe.base_batch, answer_weight=1.0, context=recipe.context,
        desc="zoo: base model", progress=progress)}
    _save(base, tokenizer, folder / MODEL_NAMES["base"])
    for k, domain in enumerate(SPECIALISTS, start=1):
        torch.manual_seed(recipe.seed * 1000 + k)
        model = copy.deepcopy(base)
        losses[domain] = _train_with_bar(
            model, tokenizer, specialist_examples(recipe, domain, random.Random(recipe.seed * 1000 + k)),
            steps=recipe.specialist_steps, lr=recipe.specialist_lr, batch=recipe.specialist_batch,
            answer_weight=recipe.answer_weight, context=recipe.context,
            desc=f"zoo: {domain} specialist", progress=progress)
        _save(model, tokenizer, folder / MODEL_NAMES[domain])
    log("zoo trained: final losses " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
    return losses


def ensure_zoo(recipe: ZooRecipe | None = None, *, cache_dir: Path | None = None, progress: bool = True,
               log: Callable[[str], None] = print) -> Zoo:
    """The zoo of ``recipe`` from the cache, built first if it is not there."""
    import torch

    recipe = recipe or ZooRecipe()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = (cache / "zoo" / recipe.digest()).resolve()
    built = False
    if not (root / "zoo.json").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = root.parent / f".{root.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            losses = build_zoo(recipe, staging, progress=progress, log=log)
            (staging / "zoo.json").write_text(json.dumps(
                {"recipe": asdict(recipe), "digest": recipe.digest(), "final_losses": losses,
                 "models": MODEL_NAMES, "torch": torch.__version__}, indent=2))
            try:
                os.replace(staging, root)
            except OSError:  # another process finished the same zoo first: keep theirs
                if not (root / "zoo.json").is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        built = True
    return Zoo(root=root, base=root / MODEL_NAMES["base"],
               specialists={d: root / MODEL_NAMES[d] for d in SPECIALISTS}, built=built)
