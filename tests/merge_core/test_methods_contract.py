"""Contract suite over every registered merge method."""

from __future__ import annotations

import pytest
import torch

from merge_core import methods, rng
from merge_core.methods.base import BasePolicy, MergeParams, Scope
from merge_core.methods.sparsify import kth_largest

ALL = methods.all_methods()


def _params(method, n_models: int, **overrides) -> MergeParams:
    shared = {p.name: p.default for p in method.params if p.scope is Scope.SHARED}
    per = {p.name: (p.default if not p.required else 1.0 / n_models)
           for p in method.params if p.scope in (Scope.MODEL, Scope.INPUT)}
    if "t" in shared and shared["t"] is methods.base.REQUIRED:
        shared["t"] = 0.5
    for k, v in overrides.items():
        (shared if k in shared else per)[k] = v
    return MergeParams(shared=shared, models=[dict(per) for _ in range(n_models)])


def _inputs(method, shape, dtype, n=None):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g).to(dtype)
    n = n or max(method.min_models, min(2, method.max_models or 2))
    tensors = [(base.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(n)]
    return (base if method.base is not BasePolicy.IGNORED else None), tensors


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
@pytest.mark.parametrize("shape", [(64, 48), (300,), (3, 8, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_shape_dtype_finite(method, shape, dtype):
    base, tensors = _inputs(method, shape, dtype)
    params = _params(method, len(tensors), **({"density": 0.5} if any(
        p.name == "density" for p in method.params) else {}))
    out = method.merge(base, tensors, params, seed=3)
    assert out.shape == torch.Size(shape)
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_identity_cases(method):
    """One model at full weight (or t=1) gives that model; identical inputs give themselves."""
    shape = (32, 40)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g)
    other = base + 0.05 * torch.randn(shape, generator=g)
    names = {p.name for p in method.params}
    if method.name == "slerp":
        out = method.merge(base, [other], _params(method, 1, t=1.0))
        torch.testing.assert_close(out, other, rtol=1e-5, atol=1e-6)
        out = method.merge(base, [other], _params(method, 1, t=0.0))
        torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-6)
        return
    if method.name == "nuslerp":
        out = method.merge(None, [other, base], MergeParams(
            shared={"nuslerp_row_wise": False, "nuslerp_flatten": True},
            models=[{"weight": 1.0}, {"weight": 0.0}]))
        torch.testing.assert_close(out, other, rtol=1e-5, atol=1e-6)
        return
    if method.name == "model_stock":
        out = method.merge(base, [other, other], _params(method, 2))
        torch.testing.assert_close(out, other, rtol=1e-5, atol=1e-6)  # colinear: cos = 1, t = 1
        return
    if method.name == "multislerp":
        out = method.merge(base, [other], _params(method, 1, weight=1.0))
        torch.testing.assert_close(out, other)
        out = method.merge(base, [other, other], _params(method, 2, weight=0.5))
        torch.testing.assert_close(out, other, rtol=1e-5, atol=1e-6)
        return
    if method.name in ("sce", "ram", "ramplus_tl"):
        params = _params(method, 1, **({"epsilon": 0.0} if "ram" in method.name else {}))
        torch.testing.assert_close(method.merge(base, [other], params), other, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(method.merge(base, [other, other], _params(method, 2, **(
            {"epsilon": 0.0} if "ram" in method.name else {}))), other, rtol=1e-6, atol=1e-6)
        return
    if method.name == "nearswap":
        torch.testing.assert_close(method.merge(base, [other], _params(method, 1, t=1e6)), other)
        torch.testing.assert_close(method.merge(base, [other], _params(method, 1, t=0.0)), base)
        return
    if method.name == "arcee_fusion":
        torch.testing.assert_close(method.merge(base, [base.clone()], _params(method, 1)), base)
        out = method.merge(base, [other], _params(method, 1))
        took = out == other
        assert torch.all(took | (out == base)) and 0 < int(took.sum()) < took.numel()
        return
    if method.base is BasePolicy.IGNORED:  # linear, passthrough, karcher
        out = method.merge(None, [other], _params(method, 1, **({"weight": 1.0} if "weight" in names else {})))
        torch.testing.assert_close(out, other)
        return
    # task-arithmetic family: one model, weight 1, density 1 -> that model
    out = method.merge(base, [other], _params(method, 1, weight=1.0, density=1.0))
    torch.testing.assert_close(out, other, rtol=1e-6, atol=1e-6)
    # all weights zero -> the base
    out = method.merge(base, [other, other], _params(method, 2, weight=0.0, density=0.5))
    torch.testing.assert_close(out, base)


@pytest.mark.parametrize("method", [m for m in ALL if m.randomized], ids=lambda m: m.name)
def test_randomized_methods_reproducible(method):
    base, tensors = _inputs(method, (128, 96), torch.float32, n=2)
    params = _params(method, 2, density=0.4)
    a = method.merge(base, tensors, params, seed=rng.derive_seed(7, "model.layers.0.mlp.up_proj.weight"))
    b = method.merge(base, tensors, params, seed=rng.derive_seed(7, "model.layers.0.mlp.up_proj.weight"))
    c = method.merge(base, tensors, params, seed=rng.derive_seed(8, "model.layers.0.mlp.up_proj.weight"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_unknown_method_names_closest_and_known():
    with pytest.raises(ValueError) as err:
        methods.get("dare_tie")
    assert "dare_ties" in str(err.value) and "linear" in str(err.value)


def test_registry_has_every_mainstream_method():
    assert set(methods.names()) >= {"linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties",
                                    "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear",
                                    "model_stock", "passthrough", "multislerp", "karcher", "sce", "ram",
                                    "ramplus_tl", "nearswap", "arcee_fusion"}


@pytest.mark.parametrize("n", [10, 1000, 70_000, 300_001])
@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.97])
def test_kth_largest_matches_sort(n, density):
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=g).abs()
    k = max(1, int(density * n))
    expected = torch.sort(a, descending=True).values[k - 1]
    assert kth_largest(a, k) == expected


def test_kth_largest_with_heavy_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 50, (200_000,), generator=g).float()
    for k in (1, 777, 100_000, 199_999):
        assert kth_largest(a, k) == torch.sort(a, descending=True).values[k - 1]


def test_dare_keeps_about_density():
    from merge_core.methods.sparsify import Delta, prune, random_drop, with_rescale

    delta = torch.ones(200, 500)
    d = Delta(delta, torch.zeros_like(delta), torch.float32)
    kept = prune(delta, random_drop(d, 0.3, seed=11))
    frac = (kept != 0).float().mean().item()
    assert abs(frac - 0.3) < 0.01
    rescaled = prune(delta, with_rescale(d, random_drop(d, 0.3, seed=11)))
    assert rescaled.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-5)


def test_chunked_random_mask_equals_whole_draw():
    from merge_core.methods.sparsify import CHUNK, Delta, prune, random_drop

    n = 2 * CHUNK + 123
    delta = torch.ones(n)
    kept = prune(delta, random_drop(Delta(delta, torch.zeros(n), torch.float32), 0.5, seed=9))
    whole = (rng.uniform((n,), seed=9) < 0.5).float()
    assert torch.equal(kept, whole)


def test_magnitude_keeps_exactly_the_top_k_without_ties():
    from merge_core.methods.sparsify import CHUNK, Delta, magnitude, prune

    g = torch.Generator().manual_seed(2)
    delta = torch.randn(3 * CHUNK + 7, generator=g)
    kept = prune(delta, magnitude(Delta(delta, torch.zeros_like(delta), torch.float32), 0.37))
    k = int(0.37 * delta.numel())
    top = torch.topk(delta.abs(), k).indices
    expected = torch.zeros_like(delta)
    expected[top] = delta[top]
    assert torch.equal(kept, expected)


def test_della_keeps_large_entries_more_often():
    from merge_core.methods.sparsify import Delta, della_magprune, prune

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(400, 400, generator=g)
    d = Delta(delta, torch.zeros_like(delta), torch.float32)
    kept = prune(delta, della_magprune(d, 0.5, 0.3, seed=5, shape=delta.shape)) != 0
    big = delta.abs() > delta.abs().median(dim=1, keepdim=True).values
    assert kept[big].float().mean() > kept[~big].float().mean() + 0.2
    with pytest.raises(ValueError, match="epsilon"):
        della_magprune(d, 0.9, 0.2, seed=5, shape=delta.shape)


@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_inputs_are_not_modified(method):
    base, tensors = _inputs(method, (64, 48), torch.float32)
    before = [t.clone() for t in tensors] + ([base.clone()] if base is not None else [])
    params = _params(method, len(tensors), **({"density": 0.5} if any(
        p.name == "density" for p in method.params) else {}))
    method.merge(base, tensors, params, seed=1)
    after = list(tensors) + ([base] if base is not None else [])
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_multislerp_refuses_cancelling_directions():
    from merge_core.errors import MergeError

    method = methods.get("multislerp")
    x = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(MergeError, match="cancel out"):
        method.merge(None, [x, -x, x.clone()], MergeParams(shared={"normalize_weights": False, "eps": 1e-8},
                                                           models=[{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}]))
    # two antipodal tensors fall back to the linear mix, as mergekit does
    out = method.merge(None, [x, -x], MergeParams(shared={"normalize_weights": True, "eps": 1e-8},
                                                  models=[{"weight": 0.5}, {"weight": 0.5}]))
    torch.testing.assert_close(out, torch.zeros_like(x))


def test_sce_select_topk_keeps_the_most_varied_entries():
    method = methods.get("sce")
    base = torch.zeros(4)
    tvs = [torch.tensor([0.2, 1.0, 0.1, 0.3]), torch.tensor([0.4, -1.0, 0.1, 0.3]),
           torch.tensor([0.3, 0.5, 0.1, 0.3])]

    def run(topk: float) -> torch.Tensor:
        return method.merge(base, tvs, MergeParams(shared={"select_topk": topk, "int8_mask": False},
                                                   models=[{}, {}, {}]))

    full, half = run(1.0), run(0.5)
    assert bool((full != 0).all())           # every entry merged
    # entries 0 and 1 vary across models, 1 the most: the top half of them is entry 1 alone
    assert half[1] != 0 and half[0] == 0 and half[2] == 0 and half[3] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("method", ALL, ids=lambda m: m.name)
def test_cuda_equals_cpu(method):
    base, tensors = _inputs(method, (256, 96), torch.float32)
    params = _params(method, len(tensors), **({"density": 0.5} if any(
        p.name == "density" for p in method.params) else {}))
    cpu = method.merge(base, tensors, params, seed=4)
    gpu = method.merge(base.cuda() if base is not None else None, [t.cuda() for t in tensors], params, seed=4)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "breadcrumbs_ties", "task_arithmetic"])
def test_chunk_size_never_changes_a_merge(method, monkeypatch):
    """GPUs merge in much larger chunks than CPUs (fewer kernel launches): the bits must not
    depend on it."""
    from merge_core.methods import get, sparsify

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3 * sparsify.CHUNK + 11, generator=g)
    models = [base + 0.1 * torch.randn(base.shape, generator=g) for _ in range(2)]
    m = get(method)
    params = _params(m, 2, density=0.5, epsilon=0.1, gamma=0.01)
    monkeypatch.setenv("BRMERGE_KERNELS", "torch")   # the chunk loop itself, not the fused CPU kernel
    small = m.merge(base, models, params, seed=3)
    monkeypatch.setattr(sparsify, "chunk_size", lambda t: 5 * sparsify.CHUNK)
    large = m.merge(base, models, params, seed=3)
    assert torch.equal(small, large)


SELECTING = [m for m in ALL if any(p.search is not None and p.search.selects_model for p in m.params)]


@pytest.mark.parametrize("method", SELECTING, ids=lambda m: m.name)
def test_a_selecting_parameter_singles_a_model_out(method):
    """What ``Search.selects_model`` promises the search's baselines: that parameter at its
    neutral value for one model and 0 for the others, the rest at their neutral values (else
    their defaults), merges to that model."""
    n = max(method.min_models, min(3, method.max_models or 3))
    g = torch.Generator().manual_seed(2)
    base = torch.randn(32, 40, generator=g)
    tensors = [base + 0.1 * torch.randn(32, 40, generator=g) for _ in range(n)]

    def value(p, *, chosen: bool):
        if p.search is not None and p.search.selects_model:
            return p.search.neutral if chosen else 0.0
        return p.search.neutral if p.search is not None and p.search.neutral is not None else p.default

    for i in range(n):
        shared = {p.name: value(p, chosen=True) for p in method.params if p.scope is Scope.SHARED}
        models = [{p.name: value(p, chosen=j == i) for p in method.params if p.scope is not Scope.SHARED}
                  for j in range(n)]
        out = method.merge(None if method.base is BasePolicy.IGNORED else base, tensors,
                           MergeParams(shared=shared, models=models), seed=5)
        torch.testing.assert_close(out, tensors[i], rtol=1e-5, atol=1e-6)
