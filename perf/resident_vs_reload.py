"""Re-materializing a candidate with the resident API vs writing it and loading it back.

For each of N candidate recipes (TIES with varying per-layer weights over a base and two
fine-tunes), time (a) ``ResidentModels.materialize`` into the live model, and (b)
``merge_to_disk`` followed by ``AutoModelForCausalLM.from_pretrained``, in one run, and
print the per-candidate means and their ratio. Target: resident >= 10x faster.

    python perf/resident_vs_reload.py [--hidden 512 --layers 8 --candidates 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merge_core.materialize import merge_to_disk  # noqa: E402
from merge_core.recipe import Recipe  # noqa: E402
from merge_core.resident import ResidentModels  # noqa: E402
from tests.tiny import llama_config, make_llama, make_tokenizer  # noqa: E402


def candidate(base: Path, a: Path, b: Path, i: int, layers: int) -> Recipe:
    g = torch.Generator().manual_seed(i)
    wa = [round(float(x), 4) for x in torch.rand(layers, generator=g) * 1.5]
    wb = [round(float(x), 4) for x in torch.rand(layers, generator=g) * 1.5]
    return Recipe.from_dict({"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(a), "parameters": {"weight": wa, "density": 0.5}},
        {"model": str(b), "parameters": {"weight": wb, "density": 0.6}}]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--candidates", type=int, default=5)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="brmerge-resident-"))
    try:
        make_tokenizer(work / "tok")
        cfg = llama_config(vocab_size=args.vocab, hidden=args.hidden, layers=args.layers, heads=8)
        base = make_llama(work / "base", config=cfg, tokenizer_dir=work / "tok")
        a = make_llama(work / "a", seed=1, like=base, tokenizer_dir=work / "tok")
        b = make_llama(work / "b", seed=2, like=base, tokenizer_dir=work / "tok")
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        resident = ResidentModels(str(base), [str(a), str(b)], device="cpu")
        module = resident.load_module()
        n_params = sum(p.numel() for p in module.parameters())
        recipes = [candidate(base, a, b, i, args.layers) for i in range(args.candidates + 1)]
        resident.materialize(recipes[-1], module)  # warm-up (plan building, first allocations)
        merge_to_disk(recipes[-1], work / "warm", device="cpu", progress=False)

        t_res, t_disk = [], []
        for i, recipe in enumerate(recipes[:-1]):
            t0 = time.perf_counter()
            resident.materialize(recipe, module)
            t_res.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            merge_to_disk(recipe, work / f"c{i}", device="cpu", progress=False)
            loaded = AutoModelForCausalLM.from_pretrained(str(work / f"c{i}"))
            t_disk.append(time.perf_counter() - t0)
            live = module.state_dict()
            same = all(torch.equal(live[k], v) for k, v in loaded.state_dict().items())
            if not same:
                print(f"candidate {i}: resident and reloaded weights differ")
                return 1
            shutil.rmtree(work / f"c{i}")
        r, d = statistics.mean(t_res), statistics.mean(t_disk)
        print(f"model: {n_params / 1e6:.1f}M parameters, TIES over 2 fine-tunes, {args.candidates} candidates")
        print(f"resident materialize   : {r:.3f} s per candidate")
        print(f"merge to disk + reload : {d:.3f} s per candidate")
        print(f"ratio: {d / r:.1f}x   (target >= 10x); every candidate bit-identical both ways")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
