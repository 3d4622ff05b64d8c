"""TIES on three ~0.5B Llama-style bf16 models: mergekit vs brmerge, side by side.

Builds a base and two 'fine-tunes' (base + noise) of hidden 1024 and 32 layers, runs the
same recipe (TIES, density 0.5, weight 0.5, bfloat16) with `mergekit-yaml` and with
`brmerge merge` as child processes, and prints wall time and peak RSS of each and their
ratios, then how far the outputs are apart. Targets: >= 10x faster, <= 1/4 the peak RSS.

    python perf/merge_vs_mergekit.py [--workdir DIR] [--layers 32 --hidden 1024]
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from merge_core.io import TensorReader, weight_files  # noqa: E402
from merge_core.methods import sparsify  # noqa: E402
from perf._common import bin_dir, run_child, warm_page_cache, write_synthetic_llama  # noqa: E402

DENSITY = 0.5
WEIGHT = 0.5
RECIPE = """\
models:
  - model: {a}
    parameters: {{weight: %s, density: %s}}
  - model: {b}
    parameters: {{weight: %s, density: %s}}
merge_method: ties
base_model: {base}
dtype: bfloat16
""" % (WEIGHT, DENSITY, WEIGHT, DENSITY)


@dataclass
class Differences:
    """How far brmerge's output is from mergekit's, and why.

    Every differing value is put in one class by re-running mergekit's arithmetic order
    (each step rounded to bf16, as mergekit computes in the recipe's dtype) with brmerge's
    kept entries: where that reproduces mergekit's value, the two tools kept the same
    entries and differ by rounding order only (brmerge works in float32 and rounds once).
    Where it does not, the kept entries differ: that must be a |delta| tie at the cut-off,
    which brmerge keeps whole and mergekit's top-k cuts at exactly k."""

    total: int = 0
    differ: int = 0
    within_ulp: int = 0           # of those, by 1 bf16 ulp
    rounding_order: int = 0       # mergekit's order with brmerge's kept entries gives mergekit's value
    at_cut: int = 0               # it does not, and some model's |delta| ties at its cut-off there
    unexplained: int = 0          # neither
    largest: float = 0.0
    tied_at_cut: int = 0          # entries whose |delta| equals the cut-off (all models)
    tied_beyond_k: int = 0        # ... that brmerge keeps and a top-k of exactly k drops

    def lines(self) -> str:
        return "\n".join([
            f"output values that differ: {self.differ} of {self.total} ({self.differ / self.total:.2e}); "
            f"largest difference {self.largest:.3g}; {self.within_ulp} of them by 1 bf16 ulp",
            f"  rounding order only (mergekit rounds each step to bf16; same kept entries): {self.rounding_order}",
            f"  a |delta| tie at the density cut-off (different kept entries): {self.at_cut}",
            f"  not explained by either: {self.unexplained}",
            f"  |delta| tied at the cut-off: {self.tied_at_cut} entries, {self.tied_beyond_k} of them beyond "
            f"the top k (kept by brmerge, dropped by mergekit's top-k)",
        ])


def _ordered(bits: torch.Tensor) -> torch.Tensor:
    # bf16 bit patterns (int16) -> integers in value order, so adjacent values differ by 1
    wide = bits.to(torch.int32)
    return torch.where(wide < 0, -(wide & 0x7FFF), wide)


def _mergekit_order(base: torch.Tensor, deltas: list[torch.Tensor], keeps: list[torch.Tensor],
                    weight: float) -> torch.Tensor:
    """TIES (normalize on, lambda 1) with mergekit's operations and roundings: everything in
    the inputs' dtype (bf16), on the stacked (models, n) deltas, given which entries to keep."""
    stacked = torch.stack([d * k.to(d.dtype) for d, k in zip(deltas, keeps)])
    weights = torch.full((len(deltas), 1), weight, dtype=base.dtype)
    stacked.mul_(weights)
    majority = (stacked.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
    agree = (stacked.sign() == majority).to(base.dtype)
    mixed = (stacked * agree).sum(dim=0)
    divisor = (weights * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    mixed /= divisor
    return (base + mixed).to(base.dtype)


def compare_outputs(work: Path, *, density: float, weight: float) -> Differences:
    """Compare the two outputs tensor by tensor and account for every difference."""
    readers = {m: TensorReader(weight_files(work / m)) for m in ("base", "ft_a", "ft_b", "out_mergekit",
                                                                 "out_brmerge")}
    r = Differences()
    try:
        for name in readers["out_mergekit"].names():
            ref = readers["out_mergekit"].get(name).reshape(-1)
            got = readers["out_brmerge"].get(name).reshape(-1)
            gap = (_ordered(got.view(torch.int16)) - _ordered(ref.view(torch.int16))).abs()
            r.total += gap.numel()
            differ = gap > 0
            r.differ += int(differ.sum())
            r.within_ulp += int((gap == 1).sum())
            r.largest = max(r.largest, float((got.float() - ref.float()).abs().max()))
            base = readers["base"].get(name).reshape(-1)
            deltas, keeps = [], []
            at_cut = torch.zeros_like(differ)
            for m in ("ft_a", "ft_b"):
                x = readers[m].get(name).reshape(-1)
                delta = sparsify.Delta(x, base, torch.float32)
                k = max(1, int(density * delta.numel))
                cut = sparsify.kth_largest_abs(delta, [k])[0]
                d = x - base                                # in bf16, as both tools take it
                a = d.float().abs()
                keeps.append(a >= cut)                      # brmerge keeps every tie
                deltas.append(d)
                tied = a == cut
                n_tied, n_above = int(tied.sum()), int((a > cut).sum())
                r.tied_at_cut += n_tied
                r.tied_beyond_k += n_tied - (k - n_above)
                at_cut |= tied
            replay = _mergekit_order(base, deltas, keeps, weight)
            order = differ & (replay.view(torch.int16) == ref.view(torch.int16))
            r.rounding_order += int(order.sum())
            rest = differ & ~order
            r.at_cut += int((rest & at_cut).sum())
            r.unexplained += int((rest & ~at_cut).sum())
    finally:
        for reader in readers.values():
            reader.close()
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="where models go (default: a temp dir)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--brmerge-only", action="store_true",
                    help="run brmerge only, against the mergekit output already in --workdir")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="brmerge-perf-"))
    work.mkdir(parents=True, exist_ok=True)
    dims = dict(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate, vocab=args.vocab)
    base = work / "base"
    if not (base / "config.json").exists():
        print("building models ...", flush=True)
        write_synthetic_llama(base, seed=0, base=None, **dims)
        write_synthetic_llama(work / "ft_a", seed=1, base=base, **dims)
        write_synthetic_llama(work / "ft_b", seed=2, base=base, **dims)
    with TensorReader(weight_files(base)) as r:
        n_params = sum(math.prod(r.shape(name)) for name in r.names())
    recipe = work / "ties.yaml"
    recipe.write_text(RECIPE.format(a=work / "ft_a", b=work / "ft_b", base=base))

    runs = {}
    for tool, cmd in (
        ("mergekit", [str(bin_dir() / "mergekit-yaml"), str(recipe), str(work / "out_mergekit")]),
        ("brmerge", [str(bin_dir() / "brmerge"), "merge", str(recipe), "--out", str(work / "out_brmerge"),
                     "--device", "cpu", "--quiet"]),
    ):
        if tool == "mergekit" and args.brmerge_only:
            continue
        shutil.rmtree(work / f"out_{tool}", ignore_errors=True)
        for m in ("base", "ft_a", "ft_b"):
            warm_page_cache(work / m)
        r = run_child(cmd)
        if r.returncode != 0:
            print(r.output[-3000:])
            print(f"{tool} failed with status {r.returncode}")
            return 1
        runs[tool] = r

    have_reference = (work / "out_mergekit").is_dir()
    report = compare_outputs(work, density=DENSITY, weight=WEIGHT) if have_reference else None
    mk, br = runs.get("mergekit"), runs["brmerge"]
    gib = 1 << 30
    print(f"\nTIES, 3 models of {n_params / 1e9:.2f}B parameters (bf16), density {DENSITY}, weight 0.5, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'tool':<10}{'wall s':>10}{'peak RSS GiB':>15}")
    if mk is not None:
        print(f"{'mergekit':<10}{mk.seconds:>10.1f}{mk.peak_rss_bytes / gib:>15.2f}")
    print(f"{'brmerge':<10}{br.seconds:>10.1f}{br.peak_rss_bytes / gib:>15.2f}")
    if mk is not None:
        print(f"speed-up (mergekit / brmerge wall time): {mk.seconds / br.seconds:.1f}x   (target >= 10x)")
        print(f"memory ratio (brmerge / mergekit peak RSS): {br.peak_rss_bytes / mk.peak_rss_bytes:.3f}   "
              f"(target <= 0.25)")
    if report is not None:
        print(report.lines())
    else:
        print(f"no mergekit output in {work} to compare with: run once without --brmerge-only")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
