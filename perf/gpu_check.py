"""The CUDA path, checked on a GPU machine: what a search trial and its export rely on.

On tiny Llama-style models (built here, no network), for every registered merge method that
takes a base and two fine-tunes with weights:

1. the resident merge on CUDA (``ResidentModels.materialize``, what a search worker runs) is
   bit-identical to ``merge_to_disk(device=dev)`` loaded back (what ``brmerge export``
   writes): the export's proof needs exactly this;
2. the evaluator on CUDA scores the resident model and the reloaded export identically (the
   export's dev re-score), and agrees with the CPU evaluator item by item (predictions equal,
   gold-letter probabilities within ``--tol``).

Prints one line per method and a summary; exits 1 on any mismatch. Needs a CUDA device.

    python perf/gpu_check.py [--hidden 256 --layers 4 --vocab 2048] [--tol 1e-4]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merge_core.materialize import merge_to_disk  # noqa: E402
from merge_core.recipe import Recipe  # noqa: E402
from merge_core.resident import ResidentModels  # noqa: E402
from search.demo.tiny import llama_config, make_llama, make_tokenizer  # noqa: E402

# method -> per-model parameters beyond weight (values inside each method's valid range)
METHODS: dict[str, dict[str, float]] = {
    "task_arithmetic": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5}, "breadcrumbs": {"density": 0.8, "gamma": 0.05},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05}, "della": {"density": 0.5, "epsilon": 0.1},
    "della_linear": {"density": 0.5, "epsilon": 0.1}, "nuslerp": {}, "multislerp": {},
    "arcee_fusion": {}, "nearswap": {}, "slerp": {},
}


def recipe_for(method: str, base: Path, a: Path, b: Path) -> Recipe | None:
    extra = METHODS[method]
    models = [{"model": str(m), "parameters": {"weight": w, **extra}} for m, w in ((a, 0.6), (b, 0.4))]
    data = {"merge_method": method, "base_model": str(base), "models": models, "dtype": "float32",
            "parameters": {}, "seed": 7}
    if method in ("slerp", "nearswap"):   # two models, a global t
        data = {"merge_method": method, "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}],
                "parameters": {"t": 0.3}, "dtype": "float32"}
    if method == "arcee_fusion":
        data = {"merge_method": method, "base_model": str(a), "models": [{"model": str(a)}, {"model": str(b)}],
                "dtype": "float32"}
    try:
        return Recipe.from_dict(data)
    except Exception as exc:  # noqa: BLE001 - reported, not fatal: the recipe shape differs for this method
        print(f"  {method:<18} skipped: {type(exc).__name__}: {str(exc)[:120]}")
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only to try the script itself")
    args = ap.parse_args()
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this script checks the CUDA path")
        return 2

    def sync() -> None:
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from evals.harness import Evaluator
    from merge_core.resident import as_live_module

    hf_logging.disable_progress_bar()
    print(f"{torch.cuda.get_device_name(0) if dev.startswith('cuda') else 'cpu'}, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="brmerge-gpu-"))
    bad = 0
    try:
        make_tokenizer(work / "tok", vocab_size=min(args.vocab, 1024))
        cfg = llama_config(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers)
        base = make_llama(work / "base", config=cfg, tokenizer_dir=work / "tok")
        a = make_llama(work / "a", seed=1, like=base, tokenizer_dir=work / "tok")
        b = make_llama(work / "b", seed=2, like=base, tokenizer_dir=work / "tok")
        tok = AutoTokenizer.from_pretrained(str(work / "tok"))
        evaluator = Evaluator.for_suite(tok, split="dev", source="sample", limit=6, num_fewshot=0)
        resident = ResidentModels(str(base), [str(a), str(b)], device=dev)
        live = resident.load_module()
        for method in METHODS:
            recipe = recipe_for(method, base, a, b)
            if recipe is None:
                continue
            t0 = time.perf_counter()
            try:
                if set(recipe.referenced_models()) <= {str(base), str(a), str(b)} and \
                        recipe.base_model in (str(base), None):
                    resident.materialize(recipe, live)
                    sync()
                    res_model = live
                else:   # a recipe on another base: its own resident set
                    other = ResidentModels(recipe.base_model, [r for r in recipe.referenced_models()
                                                               if r != recipe.base_model], device=dev)
                    res_model = other.load_module()
                    other.materialize(recipe, res_model)
                    sync()
            except Exception as exc:  # noqa: BLE001 - reported per method
                import traceback

                print(f"  {method:<18} resident merge failed: {type(exc).__name__}: {str(exc)[:160]}")
                if not bad:
                    print("".join(traceback.format_exc(limit=-12).splitlines(keepends=True)[-40:]))
                bad += 1
                continue
            t_res = time.perf_counter() - t0
            out = work / f"out-{method}"
            merge_to_disk(recipe, out, device=dev, progress=False)
            # as `brmerge export` scores it: the weights in a module built as a worker builds one
            disk = as_live_module(AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32), dev)
            live_state, disk_state = res_model.state_dict(), disk.state_dict()
            diff = [k for k in disk_state if not torch.equal(live_state[k], disk_state[k])]
            r_res, r_disk = evaluator.evaluate(res_model), evaluator.evaluate(disk)
            same_score = [(i.pred, i.gold_prob) for i in r_res.items] == [(i.pred, i.gold_prob) for i in r_disk.items]
            r_cpu = evaluator.evaluate(disk.to("cpu"))
            preds = all(x.pred == y.pred for x, y in zip(r_cpu.items, r_disk.items))
            worst = max(abs((x.gold_prob or 0) - (y.gold_prob or 0)) for x, y in zip(r_cpu.items, r_disk.items))
            ok = not diff and same_score and preds and worst <= args.tol
            bad += not ok
            print(f"  {method:<18} resident==export: {'yes' if not diff else f'NO ({len(diff)} tensors)'}; "
                  f"CUDA re-score equal: {'yes' if same_score else 'NO'}; CPU vs CUDA predictions equal: "
                  f"{'yes' if preds else 'NO'}, gold prob max diff {worst:.1e}; resident merge {t_res * 1e3:.1f} ms")
            del disk
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("all checks passed" if not bad else f"{bad} method(s) failed a check")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
