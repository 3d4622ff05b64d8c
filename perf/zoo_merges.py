"""Do the demo zoo's specialists compose? Each specialist and a grid of task-arithmetic merges
(base + a x legal update + b x health update), scored on the demo's dev and test items.

A merge can only beat both specialists when each keeps most of its skill beside the other's
update. This script shows whether a zoo allows that, before any search runs: if no point of
the grid keeps both skills, no per-layer search over the same updates is likely to either.
It also prints how large each specialist's update is against the base weights (the
Frobenius norm over all tensors): merges of updates as large as the weights they change are
far from the near-linear regime in which task vectors add up.

    python perf/zoo_merges.py                         # the demo's zoo (seed 0)
    python perf/zoo_merges.py --seed 1 --set facts=60 --set base_steps=300 --set specialist_lr=1e-3

``--set`` overrides a field of ``search.demo.zoo.ZooRecipe``; each recipe's zoo is trained
once (about 80-140 s on one core) and cached as the demo's is.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from a checkout

GRID = ((0.5, 0.5), (0.8, 0.8), (1.0, 1.0), (1.2, 1.2), (1.0, 0.7), (0.7, 1.0))


def override(recipe, pairs: Sequence[str]):
    fields = {f.name: f.type for f in dataclasses.fields(recipe)}
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {pair!r}: give FIELD=VALUE with FIELD one of {', '.join(fields)}")
        current = getattr(recipe, key)
        changes[key] = type(current)(float(value)) if isinstance(current, int) else type(current)(value)
    return dataclasses.replace(recipe, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the zoo's seed (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a ZooRecipe field (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from evals.harness import Evaluator
    from perf._common import environment
    from search.demo import facts as F
    from search.demo.zoo import SPECIALISTS, ZooRecipe, ensure_zoo

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    recipe = override(dataclasses.replace(ZooRecipe(), seed=args.seed), args.set)
    start = time.perf_counter()
    zoo = ensure_zoo(recipe, progress=False, log=lambda m: print(m, file=sys.stderr))
    trained = time.perf_counter() - start
    facts, _ = recipe.make_facts()
    data = F.write_data_dir(facts, Path(tempfile.mkdtemp(prefix="brmerge-zoo-merges-")))
    tokenizer = AutoTokenizer.from_pretrained(str(zoo.base))
    evaluators = {split: Evaluator.for_suite(tokenizer, split=split, source="data", data_dir=data,
                                             domains=list(SPECIALISTS), limit=None, num_fewshot=0,
                                             purpose="search", allow_test=split == "test")
                  for split in ("dev", "test")}

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    base = load(zoo.base)
    b = base.state_dict()
    updates = {d: {k: v - b[k] for k, v in load(zoo.specialists[d]).state_dict().items()} for d in SPECIALISTS}
    work = load(zoo.base)

    def row(name: str, weights: dict[str, float]) -> str:
        work.load_state_dict({k: b[k] + sum(w * updates[d][k] for d, w in weights.items()) for k in b})
        cells = []
        for split, ev in evaluators.items():
            acc = {m.domain: m.acc for m in ev.evaluate(work).tasks.values()}
            cells.append(" ".join(f"{acc[d]:.3f}" for d in SPECIALISTS) + f" {sum(acc.values()) / len(acc):.3f}")
        return f"| {name} | " + " | ".join(cells) + " |"

    norm = lambda sd: sum(float(v.float().norm() ** 2) for v in sd.values()) ** 0.5  # noqa: E731
    print(f"zoo {zoo.root.name} (seed {recipe.seed}, {recipe.facts} facts a domain; "
          + ", ".join(f"{p}" for p in args.set) + ("; " if args.set else "")
          + f"{'trained' if zoo.built else 'cached'} in {trained:.0f} s)")
    print("update / base weights (Frobenius): "
          + ", ".join(f"{d} {norm(updates[d]) / norm(b):.2f}" for d in SPECIALISTS))
    print()
    print("| model | dev legal health mean | test legal health mean |")
    print("| --- | --- | --- |")
    print(row("base", {}))
    for d in SPECIALISTS:
        print(row(f"{d} specialist", {d: 1.0}))
    for a, c in GRID:
        print(row(f"base + {a} legal + {c} health", dict(zip(SPECIALISTS, (a, c)))))
    print(f"\nwall time {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.2f}")
    print("environment: " + ", ".join(f"{k} {v}" for k, v in environment().items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
