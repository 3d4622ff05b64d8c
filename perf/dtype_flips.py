"""How many predictions flip when the evaluator runs a model in bfloat16 instead of float32.

Builds a small Llama-style model with the search/demo/tiny.py helpers (random weights, hidden
256, 4 layers, a 4096-position window so prompts are not truncated) and a BPE tokenizer
trained on the PT-BR items, then scores the same items with the resident evaluator twice:
the model loaded in float32 and in bfloat16 (what ``eval.dtype: auto`` picks on a GPU for a
bf16 checkpoint). It prints, per task, the items, the predictions that differ, the accuracy in
each dtype and the mean |difference| of the gold-letter probability, for the sample suite and
the dev suite of the data directory.

A randomly initialised model is close to uniform over the letters (margins of a few 1e-3), so
this is a harsh case for bfloat16's 8-bit mantissa; a trained model's margins are wider.

    python perf/dtype_flips.py --data-dir ../shared/data/ptbr --limit 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from benchmarks_ptbr.suite import load_suite, resolve_data_dir  # noqa: E402
from evals.harness import Evaluator  # noqa: E402
from search.demo.tiny import llama_config, make_llama, make_tokenizer  # noqa: E402


def build(root: Path, *, corpus: list[str], vocab: int, hidden: int, layers: int) -> Path:
    make_tokenizer(root / "tok", vocab_size=vocab, corpus=corpus)
    config = llama_config(vocab_size=vocab, hidden=hidden, layers=layers, heads=max(1, hidden // 64))
    config.max_position_embeddings = 4096
    return make_llama(root / "model", seed=0, config=config, tokenizer_dir=root / "tok")


def compare(path: Path, suite, tok) -> list[tuple[str, int, int, float, float, float]]:
    from transformers import AutoModelForCausalLM

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
        results[dtype] = Evaluator(tok, suite, purpose="report", allow_test=True).evaluate(model)
    a, b = results[torch.float32], results[torch.bfloat16]
    rows = []
    for name in a.tasks:
        xa = [i for i in a.items if i.task == name]
        xb = [i for i in b.items if i.task == name]
        flips = sum(p.pred != q.pred for p, q in zip(xa, xb))
        delta = sum(abs(p.gold_prob - q.gold_prob) for p, q in zip(xa, xb)) / max(len(xa), 1)
        rows.append((name, len(xa), flips, a.tasks[name].acc, b.tasks[name].acc, delta))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="PT-BR data (default: $BRMERGE_DATA_DIR "
                        "or ../shared/data/ptbr)")
    parser.add_argument("--limit", type=int, default=100, help="dev items per task (default 100)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    torch.manual_seed(0)

    data_dir = resolve_data_dir(args.data_dir) or (REPO.parent / "shared" / "data" / "ptbr")
    suites = {"sample": load_suite(split="dev", source="sample"),
              "dev": load_suite(split="dev", source="data", data_dir=data_dir, limit=args.limit)}
    corpus = [t.context(i) for s in suites.values() for t in s.tasks for i in t.items]
    from transformers import AutoTokenizer

    print(f"model: random Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'suite':7} {'task':34} {'items':>5} {'flips':>5} {'acc f32':>7} {'acc bf16':>8} "
          f"{'mean |dp|':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        path = build(Path(tmp), corpus=corpus, vocab=args.vocab, hidden=args.hidden, layers=args.layers)
        tok = AutoTokenizer.from_pretrained(str(path))
        for label, suite in suites.items():
            total = flipped = 0
            for name, n, flips, acc32, acc16, delta in compare(path, suite, tok):
                total, flipped = total + n, flipped + flips
                print(f"{label:7} {name:34} {n:5d} {flips:5d} {acc32:7.3f} {acc16:8.3f} {delta:9.2e}")
            print(f"{label:7} {'all':34} {total:5d} {flipped:5d}  ({flipped / max(total, 1):.1%} flipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
