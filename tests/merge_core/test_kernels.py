"""The fused numba kernels against the torch reference path, bit for bit.

Every task-arithmetic method, float32 / bfloat16 / float16, sizes below the direct-select
size, between it and the chunk size, and above the chunk size, with several densities and
weights (negative and zero included), ``normalize`` and ``rescale`` on and off.

The one result that is not bit-identical by construction is the ``rescale`` factor: both
paths sum the L1 norms in float64, in different orders, so the factors may differ in the
last float64 bits; the float32 factor used by the merge (and so the output) only changes
if it lies within ~1e-12 of a float32 rounding boundary. The tests below would see it as
an output difference of at most 1 ulp of the output dtype; none occurs on these inputs.

Every test runs twice: with the kernels on the calling thread alone (as the disk merge runs
them, several tensors at once) and on two threads that split each tensor's blocks.
"""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
import torch

from merge_core import rng
from merge_core.methods import kernels, runtime, sparsify
from merge_core.methods.kernels import fused
from merge_core.methods.base import MergeParams, Scope
from merge_core.methods.task_arithmetic import METHODS

BY_NAME = {m.name: m for m in METHODS}
SIZES = {
    "small": (24, 40),                                            # < direct-select size
    "middle": (300, 257),                                         # direct-select < n < CHUNK
    "large": (sparsify.CHUNK // 512 + 3, 512),                    # > CHUNK, a ragged last block
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (weights, densities) per model
CASES = {
    "ties_like": ([0.5, 0.5], [0.5, 0.5]),
    "three_mixed": ([1.0, 0.3, 0.6], [0.2, 0.9, 0.7]),
    "negative_zero": ([0.8, -0.4, 0.0], [0.3, 0.6, 0.45]),
    "sum_zero": ([0.5, -0.5], [0.4, 0.6]),
    "single": ([0.7], [0.35]),
}


@pytest.fixture(autouse=True, params=[1, 2], ids=["serial", "parallel"])
def kernel_threads(request):
    with runtime.settings(threads=request.param):
        yield request.param


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, n: int, seed: int = 0,
            ties: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    if ties:  # many equal |delta|: stress the cut-off
        others = [base + torch.randint(-4, 5, shape, generator=g) * 2.0 ** -10 for _ in range(n)]
    else:
        others = [base + torch.randn(shape, generator=g) * 0.002 for _ in range(n)]
    return base.to(dtype), [x.to(dtype) for x in others]


def _params(method, weights: list[float], densities: list[float], **shared) -> MergeParams:
    base_shared = {p.name: p.default for p in method.params if p.scope is Scope.SHARED}
    base_shared.update(shared)
    per = []
    for w, d in zip(weights, densities):
        p = {"weight": w, "density": d}
        if method.prune == "magnitude_outliers":
            p["gamma"] = 0.02
        if method.prune == "della_magprune":
            p["epsilon"] = min(0.15, d / 2, (1 - d) / 2)
        per.append(p)
    return MergeParams(shared=base_shared, models=per)


def _both(method, base, tensors, params, monkeypatch, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    fast = method.merge(base, tensors, params, seed=seed)
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    ref = method.merge(base, tensors, params, seed=seed)
    monkeypatch.delenv(kernels.ENV_VAR)
    return fast, ref


def _assert_identical(fast: torch.Tensor, ref: torch.Tensor) -> None:
    assert fast.dtype == ref.dtype and fast.shape == ref.shape
    differ = _bits(fast) != _bits(ref)
    if differ.any():
        i = int(differ.reshape(-1).nonzero()[0])
        pytest.fail(f"{int(differ.sum())} of {fast.numel()} values differ; first at {i}: "
                    f"{fast.reshape(-1)[i].item()!r} vs {ref.reshape(-1)[i].item()!r}")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("size", ["small", "middle"])     # "large": the two tests below
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_fused_equals_torch(name: str, dtype: torch.dtype, size: str, case: str, monkeypatch) -> None:
    method = BY_NAME[name]
    weights, densities = CASES[case]
    base, tensors = _inputs(SIZES[size], dtype, len(weights), seed=len(case))
    fast, ref = _both(method, base, tensors, _params(method, weights, densities), monkeypatch)
    _assert_identical(fast, ref)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_fused_equals_torch_options(name: str, dtype: torch.dtype, normalize: bool, rescale: bool,
                                    monkeypatch) -> None:
    method = BY_NAME[name]
    weights, densities = CASES["three_mixed"] if "della" not in name else ([1.0, 0.3, 0.6], [0.2, 0.6, 0.7])
    params = _params(method, weights, densities, normalize=normalize, rescale=rescale, **{"lambda": 1.3})
    base, tensors = _inputs(SIZES["large"], dtype, 3, seed=11)
    fast, ref = _both(method, base, tensors, params, monkeypatch)
    _assert_identical(fast, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "dare_ties"])
def test_fused_equals_torch_with_ties_at_the_cutoff(name: str, dtype: torch.dtype, monkeypatch) -> None:
    method = BY_NAME[name]
    base, tensors = _inputs(SIZES["large"], dtype, 3, seed=5, ties=True)
    params = _params(method, [0.6, 0.3, -0.2], [0.3, 0.5, 0.8], rescale=True)
    fast, ref = _both(method, base, tensors, params, monkeypatch)
    _assert_identical(fast, ref)


@pytest.mark.parametrize("size", ["small", "middle"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_finite_inputs_match(dtype: torch.dtype, size: str, monkeypatch) -> None:
    method = BY_NAME["ties"]
    base, tensors = _inputs(SIZES[size], dtype, 2, seed=3)
    bad = [float("inf"), float("-inf")]
    # A NaN delta ranks above inf in the kernels' select, as in torch.kthvalue (the torch
    # path's direct select); the torch path's bracketed search (middle size) skips NaN
    # instead, so NaN inputs are only compared where the torch path uses kthvalue.
    if size == "small":
        bad.append(float("nan"))
    tensors[0].view(-1)[[5, 77, 100][:len(bad)]] = torch.tensor(bad, dtype=dtype)
    fast, ref = _both(method, base, tensors, _params(method, [0.5, 0.5], [0.5, 0.5]), monkeypatch)
    # NaN payloads may differ (torch itself writes 0x7FC0 or 0xFFFF for a bf16 NaN depending
    # on its vector path); everything else must be identical
    assert torch.equal(fast.isnan(), ref.isnan())
    keep = ~ref.isnan()
    assert torch.equal(_bits(fast)[keep], _bits(ref)[keep])


@pytest.mark.parametrize("densities", [[1.0, 1.0], [1.0, 0.4], [0.3, 0.6]])
@pytest.mark.parametrize("lam", [1.0, 0.7])
def test_two_float32_models_one_loop(densities: list[float], lam: float, monkeypatch) -> None:
    # TIES over two float32 models takes the kernels' one-loop path (_pair_f32_row); an
    # unpruned model (density 1) goes through it with no cut; inf/NaN inputs included
    method = BY_NAME["ties"]
    base, tensors = _inputs(SIZES["middle"], torch.float32, 2, seed=9)
    tensors[0].view(-1)[[3, 50, 7000]] = torch.tensor([float("inf"), float("nan"), float("-inf")])
    params = _params(method, [0.7, -0.2], densities, **{"lambda": lam})
    if densities[0] < 1:   # the torch path's bracketed select skips NaN (see above): no NaN there
        tensors[0].view(-1)[50] = 0.5
    fast, ref = _both(method, base, tensors, params, monkeypatch)
    assert torch.equal(fast.isnan(), ref.isnan())
    keep = ~ref.isnan()
    assert torch.equal(_bits(fast)[keep], _bits(ref)[keep])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 1000, 70_000, 600_001])
def test_kth_largest_abs_exact(dtype: torch.dtype, n: int, monkeypatch) -> None:
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4).to(dtype)
    base = torch.zeros(n, dtype=dtype)
    ks = sorted({1, max(1, n // 3), max(1, n // 2), n})
    delta = sparsify.Delta(x, base, torch.float32)
    fast = sparsify.kth_largest_abs(delta, ks)
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    ref = sparsify.kth_largest_abs(delta, ks)
    exact = torch.sort(x.float().abs(), descending=True).values
    for k, a, b in zip(ks, fast, ref):
        assert a.item() == b.item() == exact[k - 1].item(), k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("keep_kind", ["band", "random", "dense"])
def test_l1_norms_match_torch(dtype: torch.dtype, keep_kind: str) -> None:
    base, (x,) = _inputs(SIZES["large"], dtype, 1, seed=2)
    delta = sparsify.Delta(x, base, torch.float32)
    if keep_kind == "band":
        keep = sparsify.magnitude_outliers(delta, 0.5, 0.05)
    elif keep_kind == "random":
        keep = sparsify.random_drop(delta, 0.3, seed=99)
    else:
        keep = sparsify.della_magprune(delta, 0.5, 0.1, seed=99, shape=base.shape)
    before, after = kernels.l1_norms(x, base, keep)
    d = delta.full()
    ref_before = d.abs().sum(dtype=torch.float64).item()
    ref_after = sparsify.prune(d, keep).abs().sum(dtype=torch.float64).item()
    assert before == pytest.approx(ref_before, rel=1e-12)
    assert after == pytest.approx(ref_after, rel=1e-12)
    assert np.float32(before / after) == np.float32(ref_before / ref_after)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_count_nonfinite_matches_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    t = torch.randn(3 * kernels.BLOCK + 11, generator=g).to(dtype)
    assert kernels.count_nonfinite(t) == 0
    t[[0, 5, kernels.BLOCK, 2 * kernels.BLOCK + 3, t.numel() - 1]] = torch.tensor(
        [float("inf"), float("-inf"), float("nan"), float("inf"), float("nan")], dtype=dtype)
    assert kernels.count_nonfinite(t) == int((~t.isfinite()).sum()) == 5


def test_threads_split_the_blocks(kernel_threads, monkeypatch) -> None:
    # one thread: the whole tensor on the calling thread (what several merge workers may do
    # at once); more: ranges of whole blocks that cover the tensor once, on the caller and
    # helper threads
    calls = []
    real = fused.combine_kernel

    def spy(inputs, *args):
        origin, n = inputs.origin, inputs.base.size
        calls.append((origin, origin + n, threading.current_thread().name))
        return real(inputs, *args)

    monkeypatch.setattr(fused, "combine_kernel", spy)
    method = BY_NAME["dare_ties"]          # random masks: each range must hash tensor indices
    base, tensors = _inputs(SIZES["large"], torch.bfloat16, 2)
    params = _params(method, [0.5, 0.5], [0.5, 0.5])
    got = method.merge(base, tensors, params, seed=0)
    ranges = sorted((s, e) for s, e, _ in calls)
    assert ranges[0][0] == 0 and ranges[-1][1] == base.numel()
    assert all(a[1] == b[0] and a[1] % kernels.BLOCK == 0 for a, b in itertools.pairwise(ranges))
    threads = {name for _, _, name in calls}
    if kernel_threads == 1:
        assert len(calls) == 1 and threads == {threading.current_thread().name}
    else:
        assert len(calls) > 1 and all(name == threading.current_thread().name or name.startswith("brmerge-kernel")
                                      for name in threads)
    monkeypatch.undo()
    with runtime.settings(threads=3 - kernel_threads):   # the other way: the same bits
        _assert_identical(got, method.merge(base, tensors, params, seed=0))


@pytest.mark.parametrize("offset", [0, 12345, (1 << 33) + 7])
@pytest.mark.parametrize("seed", [0, 1, 123456789, (1 << 62) - 1, rng.derive_seed(42, "model.layers.0.mlp", 1)])
def test_uniform_bit_identical_to_rng(seed: int, offset: int) -> None:
    n = 100_003
    ref = rng.uniform((n,), seed=seed, offset=offset).numpy()
    got = kernels.uniform(n, seed=seed, offset=offset)
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rounding_and_widening_match_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-(1 << 31), 1 << 31, (1 << 20,), generator=g, dtype=torch.int64).to(torch.int32)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 65504.0, 65519.99, 65520.0, 2.0 ** -24,
                             2.0 ** -25, 2.0 ** -25 * 1.0000001, 2.0 ** -14, 1e-40, -1e-45, 3.0e38],
                            dtype=torch.float32)
    values = torch.cat([bits.view(torch.float32), specials, torch.randn(1 << 16, generator=g),
                        torch.randn(1 << 16, generator=g) * 1e-6])
    ref = values.to(dtype)
    got = torch.from_numpy(kernels.round_to(values.numpy(), dtype).view(np.int16))
    finite = ~ref.isnan()
    assert torch.equal(got[finite], ref.view(torch.int16)[finite])
    assert torch.equal(got.view(dtype).isnan(), ref.isnan())
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    wide = torch.from_numpy(kernels.widen(every.numpy().view(np.uint16), dtype))
    ref_wide = every.view(dtype).float()
    keep = ~ref_wide.isnan()
    assert torch.equal(wide.view(torch.int32)[keep], ref_wide.view(torch.int32)[keep])
    assert torch.equal(wide.isnan(), ref_wide.isnan())


def test_switch_forces_torch(monkeypatch) -> None:
    t = torch.zeros(4)
    assert sparsify.kernels_for(t, t) is kernels
    monkeypatch.setenv(kernels.ENV_VAR, "torch")
    assert sparsify.kernels_for(t, t) is None
    monkeypatch.delenv(kernels.ENV_VAR)
    assert sparsify.kernels_for(t, t.double()) is None          # mixed dtypes: torch path
    assert sparsify.kernels_for(t.double(), t.double()) is None  # float64: torch path

