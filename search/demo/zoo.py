"""The demo's model zoo: a tiny Llama-style base and two specialists, trained on the CPU.

The zoo learns the demo's own synthetic facts (``search.demo.facts``), not exam questions:

- The base learns Portuguese from ``CORPUS`` (prose written for this project on law, health
  and ENEM topics) and facts of its own about *format subjects* (disjoint from the specialists'
  facts): their prose and questions in every dev and test phrasing, each subject with a fixed
  answer (``base_facts_weight``). Like a pretrained model, it already knows how to recall a
  fact of this form when asked in any of these words; it knows none of the specialists' facts.
  (With ``base_facts_weight = 0`` the format questions carry random letters and the base
  learns the format only; its specialists' updates were then about as large as the base
  weights and did not compose in any merge: ``perf/zoo_merges.py``.)
- Each specialist is fine-tuned from the base on its domain's facts: their prose, and the dev
  questions with their answers. The loss covers the whole sequence, the answer letter weighted
  more (one token in ~80, it was otherwise not learned in a CPU budget). Test questions ask
  the same facts in other words; the specialists never see them. The two specialists train
  at the same time in two processes when there are two CPUs (bit-identical to one after the
  other).

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
from collections.abc import Callable, Iterator
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
from search.demo import facts as F

if TYPE_CHECKING:  # torch loads in seconds: only when a zoo is actually trained
    import torch

CACHE_ENV = "BRMERGE_CACHE_DIR"
SPECIALISTS = ("legal", "health")      # one fine-tune per domain, in this order
MODEL_NAMES = {"base": "ptbr-tiny-base", "legal": "ptbr-tiny-legal", "health": "ptbr-tiny-health"}

# Written for brmerge (not taken from any exam): general prose, so the base learns the language.
# Package data (``corpus.json``) so the text can be read and edited apart from the code.
CORPUS: tuple[str, ...] = tuple(json.loads(
    (importlib.resources.files(__package__) / "corpus.json").read_text(encoding="utf-8")))


@dataclass(frozen=True)
class ZooRecipe:
    """Everything the zoo depends on; its digest names the cache folder."""

    seed: int = 0
    vocab_size: int = 1024       # ~80 tokens a question: short sequences are what a CPU can afford
    hidden: int = 128            # at 64 the two specialists' updates interfered: no merge kept both skills
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    context: int = 2048          # room for 3-shot prompts too, not only the demo's 0-shot
    facts: int = 60              # facts per domain: x2 phrasings = 120 dev and 120 test items a domain
    format_subjects: int = 60    # other subjects per domain, for the base's format questions
    base_steps: int = 400        # long enough for the base to learn its own facts (base_facts_weight)
    base_lr: float = 2e-3
    base_batch: int = 8
    specialist_steps: int = 500
    specialist_lr: float = 5e-4  # at hidden 64 and 3e-3 the updates were 0.8 of the base weights' norm
    # the health specialist's learning rate over specialist_lr (a variant: fine-tunes of unequal
    # strength, where equal weights under-use the weaker one; README "How the zoo was made to compose")
    health_lr_ratio: float = 1.0
    specialist_batch: int = 8
    answer_weight: float = 40.0  # the answer letter is 1 token in ~80: at 10 it was not learned in 300 steps
    prose_fraction: float = 0.3  # share of training texts that are prose rather than questions
    # 0: the base's format subjects come with random answer letters (it learns the format only).
    # > 0: each format subject has a fixed answer the base learns, from prose and from questions
    # in every phrasing, the letter weighted this much: a base that already knows how to recall
    # facts of this form, so the specialists only add facts (see perf/zoo_merges.py)
    base_facts_weight: float = 40.0
    # Variants kept for perf/zoo_merges.py --set (tried on the 128-wide zoo, none composed more
    # reliably; README "How the zoo was made to compose"):
    # share of each specialist's training texts that rehearse the base's own format facts (both
    # domains, with the base's answers), so the update might learn to leave other inputs alone
    replay_fraction: float = 0.0
    disjoint_names: bool = False    # each domain's made-up names from its own syllable onsets
    shuffle_options: bool = False   # each question lists the four values in an order of its own
    threads: int = 1             # per training process: the two specialists train side by side on 2 cores
    # the base trains alone, before them, on this many threads (the second core was idle at 1).
    # 1 and 2 gave bit-identical zoos where measured (README), but float sums split across
    # threads need not on every CPU, so it is part of the recipe (and of the cache's digest)
    base_threads: int = 2
    version: int = 4             # bump when the training code changes what it produces

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        h.update("\n".join(CORPUS).encode())
        facts, fmt = self.make_facts()
        h.update(F.digest(facts).encode())
        h.update(json.dumps(fmt, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def specialist_lr_of(self, domain: str) -> float:
        return self.specialist_lr * (self.health_lr_ratio if domain == "health" else 1.0)

    def make_facts(self) -> tuple[dict[str, list[F.Fact]], dict[str, list[str]]]:
        return F.make_facts(facts=self.facts, format_subjects=self.format_subjects, seed=self.seed,
                            disjoint=self.disjoint_names, shuffled=self.shuffle_options)


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


def _question_text(domain: str, row: dict, letter: str) -> str:
    item = Item(id="", question=row["question"], labels=tuple(c["label"] for c in row["choices"]),
                texts=tuple(c["text"] for c in row["choices"]), answer=letter, year=None, exam="",
                source="demo", note="", pair="")
    return format_query(item, domain) + TARGET_DELIMITER


def _exam_example(domain: str, row: dict, letter: str) -> Example:
    """A prompt-shaped text, exactly as the evaluator builds it at 0 shots, then a letter."""
    text = DESCRIPTIONS[domain] + _question_text(domain, row, letter)
    return Example(text + letter + FEWSHOT_DELIMITER, (len(text),))


def _phrasings(domain: str) -> tuple[str, ...]:
    spec = F.DOMAIN_FACTS[domain]
    return spec.dev + spec.test


def tokenizer_corpus(recipe: ZooRecipe) -> list[str]:
    facts, fmt = recipe.make_facts()
    texts = list(CORPUS)
    for domain in SPECIALISTS:
        texts += [F.prose(f) for f in facts[domain]]
        texts += [_exam_example(domain, F.question(domain, s, p), "A").text
                  for s in fmt[domain] for p in _phrasings(domain)]
    return texts


def base_facts(recipe: ZooRecipe) -> dict[str, dict[str, int]]:
    """The fixed answer (an index into the domain's values) of every format subject, drawn from
    the recipe's seed; used only when ``base_facts_weight`` > 0."""
    _, fmt = recipe.make_facts()
    rng = random.Random(f"base-facts-{recipe.seed}")
    return {d: {subject: rng.randrange(len(F.LABELS)) for subject in fmt[d]} for d in SPECIALISTS}


def base_examples(recipe: ZooRecipe, rng: random.Random) -> Iterator[Example]:
    """Endless base-training texts: prose, or a format subject's question with a random letter
    (or, with ``base_facts_weight``, its fixed answer; half the prose is then those facts')."""
    if recipe.base_facts_weight > 0:
        yield from _base_fact_examples(recipe, rng)
        return
    _, fmt = recipe.make_facts()
    while True:
        if rng.random() < recipe.prose_fraction:
            start = rng.randrange(len(CORPUS))
            yield Example("\n\n".join(CORPUS[start:start + 2]))
        else:
            domain = rng.choice(SPECIALISTS)
            row = F.question(domain, rng.choice(fmt[domain]), rng.choice(_phrasings(domain)),
                             recipe.shuffle_options)
            # a random letter carries no signal: no extra weight on it
            yield Example(_exam_example(domain, row, rng.choice(F.LABELS)).text)


def _base_fact_examples(recipe: ZooRecipe, rng: random.Random) -> Iterator[Example]:
    answers = base_facts(recipe)
    subjects = {d: list(answers[d]) for d in SPECIALISTS}   # in the facts' order: seeded draws repeat
    while True:
        draw = rng.random()
        domain = rng.choice(SPECIALISTS)
        spec = F.DOMAIN_FACTS[domain]
        if draw < recipe.prose_fraction / 2:
            start = rng.randrange(len(CORPUS))
            yield Example("\n\n".join(CORPUS[start:start + 2]))
        elif draw < recipe.prose_fraction:
            chosen = rng.sample(subjects[domain], 4)
            yield Example(" ".join(spec.prose.format(s=s, v=spec.values[answers[domain][s]]) for s in chosen))
        else:
            subject = rng.choice(subjects[domain])
            phrasing = rng.choice(_phrasings(domain))
            row = F.question(domain, subject, phrasing, recipe.shuffle_options)
            yield _exam_example(domain, row, F.letter(subject, phrasing, answers[domain][subject],
                                                      recipe.shuffle_options))


def specialist_examples(recipe: ZooRecipe, domain: str, rng: random.Random) -> Iterator[Example]:
    """Endless fine-tuning texts: a few facts' prose, or one dev question with its answer."""
    facts = recipe.make_facts()[0][domain]
    dev = F.rows({domain: facts}, "dev")[domain]
    replay = (_base_fact_examples(recipe, random.Random(f"replay-{recipe.seed}-{domain}"))
              if recipe.replay_fraction > 0 else None)
    while True:
        if replay is not None and rng.random() < recipe.replay_fraction:
            yield next(replay)
        elif rng.random() < recipe.prose_fraction:
            yield Example(" ".join(F.prose(f) for f in rng.sample(facts, 4)))
        else:
            row = rng.choice(dev)
            yield _exam_example(domain, row, row["answerKey"])


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
              log: Callable[[str], None] = print, parallel: bool | None = None) -> dict[str, float]:
    """Train the tokenizer, the base and the specialists into ``folder``; returns final losses.

    With ``parallel`` (the default when there are at least two CPUs) the specialists train at
    the same time in two processes of ``recipe.threads`` threads each; every specialist starts
    from the saved base with its own seeds, so the weights are the same bit for bit either way
    (``tests/search/test_demo.py``). The children re-import the calling script, so a script
    that builds a zoo must do it under ``if __name__ == "__main__":`` (a child stops at once
    with that fix otherwise)."""
    import torch

    if parallel is None:
        parallel = (os.cpu_count() or 1) >= 2 * recipe.threads
    if parallel and _importing_main():
        raise RuntimeError(GUARD_HINT)   # before minutes of training that could not finish anyway
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        return _build(recipe, folder, progress=progress, log=log, parallel=parallel)
    finally:
        torch.set_num_threads(threads)


GUARD_HINT = ("a script that trains a zoo must do so under `if __name__ == \"__main__\":`: the specialists "
              "train in child processes, which re-import the script (or pass parallel=False)")


def _importing_main() -> bool:
    """True in a spawned child while it re-imports the parent's script: a zoo trained at import
    time there would start children of its own, which multiprocessing refuses."""
    import multiprocessing

    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def _build(recipe: ZooRecipe, folder: Path, *, progress: bool, log: Callable[[str], None],
           parallel: bool) -> dict[str, float]:
    import torch
    from transformers import LlamaForCausalLM

    from search.demo.tiny import make_tokenizer

    torch.manual_seed(recipe.seed)
    tokenizer = make_tokenizer(folder / "tokenizer", vocab_size=recipe.vocab_size,
                               corpus=tokenizer_corpus(recipe))
    base = LlamaForCausalLM(_config(recipe, tokenizer))
    torch.set_num_threads(recipe.base_threads)
    try:
        losses = {"base": _train_with_bar(
            base, tokenizer, base_examples(recipe, random.Random(recipe.seed)), steps=recipe.base_steps,
            lr=recipe.base_lr, batch=recipe.base_batch, answer_weight=recipe.base_facts_weight or 1.0,
            context=recipe.context, desc="zoo: base model", progress=progress)}
    finally:
        torch.set_num_threads(recipe.threads)
    _save(base, tokenizer, folder / MODEL_NAMES["base"])
    del base
    if parallel:
        losses.update(_specialists_in_parallel(recipe, folder, progress=progress))
    else:
        for domain in SPECIALISTS:
            losses[domain] = train_specialist(recipe, folder, domain, progress=progress)
    log("zoo trained: final losses " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))
    return losses


def train_specialist(recipe: ZooRecipe, folder: Path, domain: str, *, progress: bool = False,
                     on_step: Callable[[float], None] | None = None) -> float:
    """Fine-tune ``domain``'s specialist from the base saved in ``folder`` and save it there."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    k = SPECIALISTS.index(domain) + 1
    tokenizer = AutoTokenizer.from_pretrained(str(folder / MODEL_NAMES["base"]))
    model = LlamaForCausalLM.from_pretrained(str(folder / MODEL_NAMES["base"]), dtype=torch.float32)
    torch.manual_seed(recipe.seed * 1000 + k)
    examples = specialist_examples(recipe, domain, random.Random(recipe.seed * 1000 + k))
    kwargs = dict(steps=recipe.specialist_steps, lr=recipe.specialist_lr_of(domain),
                  batch=recipe.specialist_batch,
                  answer_weight=recipe.answer_weight, context=recipe.context)
    if on_step is not None:
        loss = train(model, tokenizer, examples, on_step=on_step, **kwargs)
    else:
        loss = _train_with_bar(model, tokenizer, examples, desc=f"zoo: {domain} specialist",
                               progress=progress, **kwargs)
    _save(model, tokenizer, folder / MODEL_NAMES[domain])
    return loss


def _specialist_process(recipe: ZooRecipe, folder: str, domain: str, conn) -> None:
    """One specialist in a child process (spawned: a fresh interpreter, no inherited threads);
    it sends ("step", n) as it trains, then ("ok", loss) or ("error", traceback)."""
    import traceback

    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(recipe.threads)
    hf_logging.disable_progress_bar()   # the parent draws one bar for both children
    done = 0

    def tick(_loss: float) -> None:
        nonlocal done
        done += 1
        conn.send(("step", done))

    try:
        conn.send(("ok", train_specialist(recipe, Path(folder), domain, on_step=tick)))
    except BaseException:   # the parent raises it, with the child's traceback
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _specialists_in_parallel(recipe: ZooRecipe, folder: Path, *, progress: bool) -> dict[str, float]:
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")
    pipes = {d: ctx.Pipe(duplex=False) for d in SPECIALISTS}   # (reader, writer): no semaphores to leak
    children = {d: ctx.Process(target=_specialist_process, args=(recipe, str(folder), d, pipes[d][1]),
                               daemon=True) for d in SPECIALISTS}
    readers = {pipes[d][0]: d for d in SPECIALISTS}
    steps = dict.fromkeys(SPECIALISTS, 0)
    losses: dict[str, float] = {}
    bar = progress_bar(recipe.specialist_steps * len(children), "zoo: specialists (in parallel)", progress)
    try:
        for d, child in children.items():
            child.start()
            pipes[d][1].close()          # the child holds the writing end now
        while readers:
            for conn in wait(list(readers)):
                domain = readers[conn]
                try:
                    kind, value = conn.recv()
                except EOFError:         # closed without a result: the process died
                    children[domain].join()
                    code = children[domain].exitcode or 0
                    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                    raise RuntimeError(f"the {domain} specialist's training process {how} before it "
                                       "reported; its own error, if any, is printed above") from None
                if kind == "step":
                    steps[domain] = value
                    bar.update(sum(steps.values()) - bar.n)
                elif kind == "error":
                    raise RuntimeError(f"training the {domain} specialist failed:\n{value}")
                else:
                    losses[domain] = value
                    del readers[conn]
                    conn.close()
    finally:
        bar.close()
        for child in children.values():
            if child.is_alive():
                child.terminate()
            child.join()
    return {d: losses[d] for d in SPECIALISTS}


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
