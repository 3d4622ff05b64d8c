"""Does the demo's claim hold seed after seed? ``brmerge demo`` for seeds 0..N-1, each verdict
from the held-out test items.

For each seed (a fresh zoo: its facts, its training and its search all follow the seed) it
runs the whole demo as ``brmerge demo --seed S`` does, in this process, and prints the test
score of the best searched merge, its difference from each rival with the Holm-adjusted p and
verdict, and whether the demo's claim held ("beats both specialists and the uniform merge on
test": every Holm-adjusted comparison "better" and the intersection-union test at 0.05).

    python perf/demo_seeds.py                  # seeds 0-4, the default budget
    python perf/demo_seeds.py --seeds 2 --trials 40 --json out.json
    python perf/demo_seeds.py --sampler cmaes           # the same zoos, another sampler
    python perf/demo_seeds.py --set facts=40 --first-seed 2 --seeds 3   # another zoo recipe

Each seed trains its own zoo (cached under the brmerge cache directory, so a second run of the
script reuses it), and the wall time printed covers everything, zoo training included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from a checkout


def main(argv: Sequence[str] | None = None) -> int:
    from search.demo.run import DEFAULT_TRIALS, run_demo
    from search.demo.table import RIVALS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--trials", type=int, default=DEFAULT_TRIALS, help=f"budget per demo (default {DEFAULT_TRIALS})")
    parser.add_argument("--json", type=Path, default=None, help="also write each seed's claim here")
    parser.add_argument("--sampler", default=None, help="the search's sampler (default: the campaign default, as the demo)")
    parser.add_argument("--first-seed", type=int, default=0, help="start at this seed (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the demo's ZooRecipe (repeatable), as perf/zoo_merges.py")
    args = parser.parse_args(argv)
    import dataclasses

    from perf._common import environment
    from perf.zoo_merges import override
    from search.demo.zoo import ZooRecipe

    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="brmerge-demo-seeds-") as tmp:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            t0 = time.perf_counter()
            recipe = override(dataclasses.replace(ZooRecipe(), seed=seed), args.set)
            demo = run_demo(directory=Path(tmp) / f"seed{seed}", trials=args.trials, seed=seed,
                            progress=False, echo=lambda m: None, sampler=args.sampler, zoo_recipe=recipe)
            best = next(r for r in demo.rows if r.key == "best")
            c = demo.claim
            cells = [f"{name}: {c['test'][name]['diff']:+.3f} p_holm {c['test'][name]['p_holm']:.2g} "
                     f"{c['test'][name]['verdict']}" if c["test"].get(name) else f"{name}: -" for name in RIVALS]
            held = c["best_beats_specialists_and_uniform_on_test"]
            print(f"seed {seed}: best merge test {best.test_combined:.4f} (dev {best.combined:.4f}); "
                  + "; ".join(cells) + f"; claim {'HOLDS' if held else 'does not hold'} "
                  f"({demo.wall_seconds:.0f} s, wall {time.perf_counter() - t0:.0f} s)", flush=True)
            print("  test scores: " + ", ".join(f"{r.name} {r.test_combined:.4f}" for r in demo.rows
                                                if r.test_combined is not None), flush=True)
            results.append({"seed": seed, "sampler": args.sampler or "default", "set": args.set, "holds": held, "claim": c,
                            "best_test": best.test_combined,
                            "test_scores": {r.key: r.test_combined for r in demo.rows},
                            "best_dev": best.combined, "demo_seconds": demo.wall_seconds,
                            "timings": demo.timings})
    wall = time.perf_counter() - start
    load = os.getloadavg()
    held = sum(r["holds"] for r in results)
    env = environment()
    print(f"the claim held in {held} of {len(results)} seeds; wall time {wall:.0f} s for {len(results)} demos "
          f"on {os.cpu_count()} CPUs, load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results, "wall_seconds": wall, "load_average": load,
                                         "environment": env}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
