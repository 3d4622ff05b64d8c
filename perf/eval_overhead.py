"""Resident evaluator vs a fresh ``lm_eval.simple_evaluate`` call, per candidate.

Builds a small Llama-style model with the search/demo/tiny.py helpers (hidden 256, 4 layers by
default) and a BPE tokenizer trained on the PT-BR items, so prompts have realistic token
counts (a 4096-position window: no truncation). Then, for a few "candidates" (weights
changed in place between them, as the merge core does), it times:

- the resident evaluator: ``Evaluator.evaluate(model)`` on the dev suite with ``--limit``;
- lm-eval: TaskManager + HFLM over the same live model + ``simple_evaluate`` on the same
  items (``samples=``), i.e. what re-scoring through lm-eval costs per candidate.

It prints seconds per candidate for both, their ratio, and the share of the resident
evaluator's time spent outside the model's forward passes (timed with forward hooks).

    python perf/eval_overhead.py --data-dir ../shared/data/ptbr --limit 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
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
    resident, forward = [], []
    for c in range(args.candidates):
        perturb(model, seed=c)
        timer.total = 0.0
        t0 = time.perf_counter()
        evaluator.evaluate(model)
        resident.append(time.perf_counter() - t0)
        forward.append(timer.total)
    timer.close()

    full = load_suite(split="dev", source="data", data_dir=data_dir)
    samples = {}
    for task in suite.tasks:
        ids = [i.id for i in full.task(task.name).items]
        samples[task.name] = [ids.index(i.id) for i in task.items]
    fresh = []
    for c in range(args.candidates):
        perturb(model, seed=100 + c)
        t0 = time.perf_counter()
        tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                         metadata={"data_dir": str(data_dir)})
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.lm_eval_batch_size)
        lm_eval.simple_evaluate(model=lm, tasks=list(samples), task_manager=tm,
                                samples=samples, verbosity="ERROR")
        fresh.append(time.perf_counter() - t0)

    r, f = statistics.median(resident), statistics.median(fresh)
    outside = 1 - statistics.median(fw / tot for fw, tot in zip(forward, resident))
    print(f"resident evaluator: build once {build_s:.2f} s, then {r:.3f} s per candidate "
          f"(median of {args.candidates})")
    print(f"fresh lm_eval.simple_evaluate (batch_size={args.lm_eval_batch_size}): "
          f"{f:.3f} s per candidate")
    print(f"speed-up: {f / r:.1f}x (target >= 5x)")
    print(f"resident time outside forward passes: {100 * outside:.1f}% (target < 15%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
