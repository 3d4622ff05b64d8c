"""Resident evaluator vs a fresh ``lm_eval.simple_evaluate`` call, per candidate, and where
each one's time goes.

Builds a small Llama-style model with the search/demo/tiny.py helpers (hidden 256, 4 layers by
default) and a BPE tokenizer trained on the PT-BR items, so prompts have realistic token
counts (a 4096-position window: no truncation). Then, for a few "candidates" (weights
changed in place between them, as the merge core does), it times:

- the resident evaluator: ``Evaluator.evaluate(model)`` on the dev suite with ``--limit``;
- lm-eval: TaskManager + HFLM over the same live model + ``simple_evaluate`` on the same
  items (``samples=``), i.e. what re-scoring through lm-eval costs per candidate.

It prints, per candidate (medians): each side's seconds, split into time inside the model's
forward passes (forward hooks) and outside them; the tokens each side runs through the model
(recorded by the hooks); the matmul FLOPs those forwards cost on this model (projections and
MLP, attention scores, output head) and the same count for a 7B Llama shape (hidden 4096,
32 layers, MLP 11008, vocab 32000) on the same token shapes; the speed-up; and the load
average of the machine while it ran.

    python perf/eval_overhead.py --data-dir ../shared/data/ptbr --limit 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout

import torch  # noqa: E402

from benchmarks_ptbr.lm_eval_tasks import TASKS_DIR  # noqa: E402
from benchmarks_ptbr.suite import load_suite, resolve_data_dir  # noqa: E402
from evals.harness import Evaluator  # noqa: E402
from search.demo.tiny import llama_config, make_llama, make_tokenizer  # noqa: E402


class ForwardTimer:
    """Wall time spent inside ``module.forward`` (hooks; synchronizes CUDA around calls)."""

    def __init__(self, module: torch.nn.Module):
        self.total = 0.0
        self._start = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre),
                         module.register_forward_hook(self._post)]
        self._cuda = next(module.parameters()).is_cuda

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.synchronize()

    def _pre(self, *_):
        self._sync()
        self._start = time.perf_counter()

    def _post(self, *_):
        self._sync()
        self.total += time.perf_counter() - self._start

    def close(self) -> None:
        for h in self._handles:
            h.remove()


class ShapeRecorder:
    """(rows, new tokens, cached tokens, positions whose logits are computed) per forward."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[tuple[int, int, int, int]] = []
        self._handle = module.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = cache.get_seq_length() if cache is not None else 0
        keep = kwargs.get("logits_to_keep") or ids.shape[1]
        self.calls.append((ids.shape[0], ids.shape[1], int(cached), int(keep)))

    def close(self) -> None:
        self._handle.remove()


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int

    def flops(self, calls: list[tuple[int, int, int, int]]) -> dict[str, float]:
        """Matmul FLOPs of these forwards: per token, q/k/v/o and MLP weights; per query,
        attention scores and values over every key it sees (causal: the cached keys plus
        half its own chunk on average); the output head where logits are computed."""
        h, i = self.hidden, self.intermediate
        dense = attention = head = 0.0
        for rows, new, cached, keep in calls:
            tokens = rows * new
            dense += 2 * tokens * self.layers * (4 * h * h + 3 * h * i)
            attention += 2 * 2 * tokens * self.layers * h * (cached + (new + 1) / 2)
            head += 2 * rows * keep * h * self.vocab
        return {"dense": dense, "attention": attention, "head": head,
                "total": dense + attention + head}


SEVEN_B = Shape(hidden=4096, layers=32, intermediate=11008, vocab=32000)


def build_model(root: Path, *, corpus: list[str], vocab: int, hidden: int, layers: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    make_tokenizer(root / "tok", vocab_size=vocab, corpus=corpus)
    config = llama_config(vocab_size=vocab, hidden=hidden, layers=layers, heads=max(1, hidden // 64))
    config.max_position_embeddings = 4096  # real-sized few-shot prompts fit without truncation
    make_llama(root / "model", seed=0, config=config, tokenizer_dir=root / "tok")
    model = AutoModelForCausalLM.from_pretrained(str(root / "model"), dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(root / "model"))


def perturb(model: torch.nn.Module, seed: int) -> None:
    """A new 'candidate': change weights in place, as merge_core.resident does."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device) * 1e-3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="PT-BR data (default: $BRMERGE_DATA_DIR "
                        "or ../shared/data/ptbr)")
    parser.add_argument("--limit", type=int, default=50, help="items per task (default 50)")
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lm-eval-batch-size", type=int, default=8)
    args = parser.parse_args()

    data_dir = resolve_data_dir(args.data_dir) or (REPO.parent / "shared" / "data" / "ptbr")
    suite = load_suite(split="dev", source="data", data_dir=data_dir, limit=args.limit)
    corpus = [t.context(i) for t in suite.tasks for i in t.items]
    import lm_eval  # noqa: F401  (import cost is paid once, outside the timings)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        model, tok = build_model(Path(tmp), corpus=corpus, vocab=args.vocab,
                                 hidden=args.hidden, layers=args.layers)
    model.to(args.device)
    n_items = sum(len(t.items) for t in suite.tasks)
    lengths = [len(tok(t.context(i))["input_ids"]) for t in suite.tasks for i in t.items]
    print(f"model: Llama hidden={args.hidden} layers={args.layers} vocab={args.vocab} "
          f"on {args.device}; suite: dev, {len(suite.tasks)} tasks, {n_items} items "
          f"(--limit {args.limit}); prompt tokens: mean {statistics.mean(lengths):.0f}, "
          f"max {max(lengths)}")

    t0 = time.perf_counter()
    evaluator = Evaluator(tok, suite)
    build_s = time.perf_counter() - t0
    evaluator.evaluate(model)  # warm-up: builds the device batches once
    timer = ForwardTimer(model)
    resident, resident_fw, resident_calls = [], [], []
    for c in range(args.candidates):
        perturb(model, seed=c)
        timer.total = 0.0
        shapes = ShapeRecorder(model)
        t0 = time.perf_counter()
        evaluator.evaluate(model)
        resident.append(time.perf_counter() - t0)
        shapes.close()
        resident_fw.append(timer.total)
        resident_calls = shapes.calls

    full = load_suite(split="dev", source="data", data_dir=data_dir)
    samples = {}
    for task in suite.tasks:
        ids = [i.id for i in full.task(task.name).items]
        samples[task.name] = [ids.index(i.id) for i in task.items]
    fresh, fresh_fw, fresh_calls = [], [], []
    for c in range(args.candidates):
        perturb(model, seed=100 + c)
        timer.total = 0.0
        shapes = ShapeRecorder(model)
        t0 = time.perf_counter()
        tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                         metadata={"data_dir": str(data_dir)})
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.lm_eval_batch_size)
        lm_eval.simple_evaluate(model=lm, tasks=list(samples), task_manager=tm,
                                samples=samples, verbosity="ERROR")
        fresh.append(time.perf_counter() - t0)
        shapes.close()
        fresh_fw.append(timer.total)
        fresh_calls = shapes.calls
    timer.close()

    r, f = statistics.median(resident), statistics.median(fresh)
    r_fw, f_fw = statistics.median(resident_fw), statistics.median(fresh_fw)
    here = Shape(hidden=args.hidden, layers=args.layers, intermediate=2 * args.hidden,
                 vocab=args.vocab)
    print(f"resident evaluator: build once {build_s:.2f} s, then {r:.3f} s per candidate "
          f"(median of {args.candidates})")
    print(f"fresh lm_eval.simple_evaluate (batch_size={args.lm_eval_batch_size}): "
          f"{f:.3f} s per candidate")
    print(f"speed-up: {f / r:.1f}x (target >= 5x)")
    print(f"resident time outside forward passes: {100 * (1 - r_fw / r):.1f}% (target < 15%)")
    print()
    print("where the time goes, per candidate:")
    for name, total, fw, calls in (("resident", r, r_fw, resident_calls),
                                   ("lm-eval", f, f_fw, fresh_calls)):
        tokens = sum(rows * new for rows, new, _, _ in calls)
        print(f"  {name:8s}: {total:7.3f} s = forward {fw:7.3f} s + outside {total - fw:6.3f} s; "
              f"{len(calls)} forwards, {tokens} tokens")
    # The best any prefix sharing can do: every item but one per task skips the shared prefix.
    whole = sum(len(q.prefix) for q in evaluator.requests)
    groups = next(iter(evaluator._groups.values()))
    prefix_of = [g.prefix.shape[1] if g.prefix is not None else 0 for g in groups]
    saved = sum((len(g.indices) - 1) * p for g, p in zip(groups, prefix_of))
    print(f"  bound from the prompts: a prompt is {whole / len(evaluator.requests):.0f} tokens on "
          f"average, its task's shared prefix (description and shots) "
          f"{statistics.mean(prefix_of):.0f}; lm-eval runs {whole} prompt tokens, prefix sharing "
          f"needs {whole - saved} (unpadded): at most {whole / (whole - saved):.1f}x fewer "
          "tokens, on any hardware")
    ours, theirs = here.flops(resident_calls), here.flops(fresh_calls)
    big_ours, big_theirs = SEVEN_B.flops(resident_calls), SEVEN_B.flops(fresh_calls)
    print(f"  forward-only speed-up here: {f_fw / r_fw:.1f}x; tokens run: "
          f"{sum(a * b for a, b, _, _ in fresh_calls) / sum(a * b for a, b, _, _ in resident_calls):.1f}x fewer")
    for label, mine, stock in (("this model", ours, theirs), ("7B shape", big_ours, big_theirs)):
        parts = ", ".join(f"{k} {mine[k] / mine['total']:.0%}" for k in ("dense", "attention", "head"))
        print(f"  matmul FLOPs, {label}: lm-eval / resident = {stock['total'] / mine['total']:.1f}x "
              f"(resident: {parts})")
    outside_ratio = (f - f_fw) / max(r - r_fw, 1e-9)
    r_tokens = sum(a * b for a, b, _, _ in resident_calls)
    f_tokens = sum(a * b for a, b, _, _ in fresh_calls)
    per_token = (r_fw / r_tokens) / (f_fw / f_tokens)
    print()
    print(f"why not >= 5x: the forward work can shrink by at most the prompt bound above "
          f"({whole / (whole - saved):.1f}x fewer tokens: the shots and description are "
          f"{statistics.mean(prefix_of) / (whole / len(evaluator.requests)):.0%} "
          "of a prompt, the question itself the rest); padding brings it to "
          f"{f_tokens / r_tokens:.1f}x. Here a resident token took {per_token:.2f}x the forward "
          "time of a lm-eval token: every resident token attends over the whole shared prefix "
          f"(attention is {ours['attention'] / ours['total']:.0%} of the resident FLOPs at hidden "
          f"{args.hidden}), each batch copies the prefix cache, and on a shared 2-core machine "
          "the two phases see different load. Only lm-eval's fixed per-candidate cost "
          f"({f - f_fw:.1f} s outside its forwards, vs {r - r_fw:.1f} s) lifts the ratio above "
          "the token bound.")
    print(f"expected on a GPU (same suite): the forwards of both sides speed up alike, so the "
          f"ratio lies between the 7B FLOP ratio, {big_theirs['total'] / big_ours['total']:.1f}x "
          f"(a large model: forwards dominate), and the outside-forward ratio, "
          f"{outside_ratio:.1f}x (a small model: lm-eval's fixed Python cost dominates).")
    print(f"load average while measuring: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
