"""Re-materializing a candidate with the resident API vs writing it and loading it back.

For each of N candidate recipes (TIES over a base and two fine-tunes, per-layer weights
and densities drawn at random, as a search proposes them), time in one run:

(a) ``ResidentModels.materialize`` into the live model, as the search runs it (its
    magnitude cache built during the warm-up candidate);
(b) ``merge_to_disk`` followed by ``AutoModelForCausalLM.from_pretrained``;

and print the per-candidate means and their ratio. Target: resident >= 10x faster. For
context it also times (c) the resident merge with the magnitude cache turned off.
Every candidate is checked bit-identical between (a), (b) and (c).

The default model has 233M float32 parameters (hidden 1024, 16 layers, vocabulary 32000):
about 1 GB per copy, 10 GB of RAM for the whole run, 3 minutes on 2 cores. On small models
the fixed cost per tensor (Python and the kernel call) weighs more: with
``--hidden 512 --layers 8 --vocab 8000`` (29M parameters) the ratio was 8.5x on 2 cores.

    python perf/resident_vs_reload.py [--hidden 1024 --layers 16 --vocab 32000 --candidates 4]
                                      [--device cuda]
"""

from __future__ import annotations

import argparse
import hashlib
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
from search.demo.tiny import llama_config, make_llama, make_tokenizer  # noqa: E402


def candidate(base: Path, a: Path, b: Path, i: int, layers: int) -> Recipe:
    g = torch.Generator().manual_seed(i)

    def values(low: float, high: float) -> list[float]:
        return [round(low + float(x) * (high - low), 4) for x in torch.rand(layers, generator=g)]

    return Recipe.from_dict({"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(a), "parameters": {"weight": values(0, 1.5), "density": values(0.1, 1)}},
        {"model": str(b), "parameters": {"weight": values(0, 1.5), "density": values(0.1, 1)}}]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where every way merges")
    args = ap.parse_args()
    device = args.device

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

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
        resident = ResidentModels(str(base), [str(a), str(b)], device=device)
        uncached = ResidentModels(str(base), [str(a), str(b)], device=device, magnitude_cache_bytes=0)
        module = resident.load_module()
        plain = uncached.load_module()
        n_params = sum(p.numel() for p in module.parameters())
        recipes = [candidate(base, a, b, i, args.layers) for i in range(args.candidates + 1)]
        # warm-up: plans, first allocations, and the resident's magnitude cache (built once
        # per search, at its first candidate)
        t0 = time.perf_counter()
        resident.materialize(recipes[-1], module)
        sync()
        t_first = time.perf_counter() - t0
        uncached.materialize(recipes[-1], plain)
        merge_to_disk(recipes[-1], work / "warm", device=device, progress=False)

        # Each way runs all candidates in turn (a disk merge's writeback then does not slow
        # the next resident merge); a digest of every candidate's weights checks them equal.
        def digest(state: dict[str, torch.Tensor]) -> str:
            h = hashlib.sha256()
            for k in sorted(state):
                h.update(k.encode())
                h.update(state[k].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            return h.hexdigest()

        t_res, t_plain, t_disk = [], [], []
        d_res, d_plain, d_disk = [], [], []
        for recipe in recipes[:-1]:
            t0 = time.perf_counter()
            resident.materialize(recipe, module)
            sync()
            t_res.append(time.perf_counter() - t0)
            d_res.append(digest(module.state_dict()))
        for recipe in recipes[:-1]:
            t0 = time.perf_counter()
            uncached.materialize(recipe, plain)
            sync()
            t_plain.append(time.perf_counter() - t0)
            d_plain.append(digest(plain.state_dict()))
        t_write = []
        for i, recipe in enumerate(recipes[:-1]):
            t0 = time.perf_counter()
            merge_to_disk(recipe, work / f"c{i}", device=device, progress=False)
            t_write.append(time.perf_counter() - t0)
            loaded = AutoModelForCausalLM.from_pretrained(str(work / f"c{i}")).to(device)
            sync()
            t_disk.append(time.perf_counter() - t0)
            d_disk.append(digest(loaded.state_dict()))
            del loaded
            shutil.rmtree(work / f"c{i}")
        for i, (x, y, z) in enumerate(zip(d_res, d_plain, d_disk)):
            if not x == y == z:
                print(f"candidate {i}: the resident merges and the reloaded one differ")
                return 1
        r, p, d = statistics.mean(t_res), statistics.mean(t_plain), statistics.mean(t_disk)
        cache = resident.magnitudes
        print(f"model: {n_params / 1e6:.1f}M parameters (float32), TIES over 2 fine-tunes, "
              f"{args.candidates} candidates, device {device}, {torch.get_num_threads()} threads")
        print(f"(a) resident materialize : {r:.3f} s per candidate  (first candidate, building the "
              f"magnitude cache of {cache.used_bytes / 2**20:.0f} MiB: {t_first:.2f} s)")
        w = statistics.mean(t_write)
        print(f"(b) merge to disk+reload : {d:.3f} s per candidate  (merge_to_disk {w:.3f} s, "
              f"from_pretrained {d - w:.3f} s)")
        print(f"(c) resident, no cache   : {p:.3f} s per candidate")
        print(f"ratio (b)/(a): {d / r:.1f}x   (target >= 10x); every candidate bit-identical in (a), (b), (c)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
