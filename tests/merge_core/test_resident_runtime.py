"""The resident merge's own machinery: the magnitude cache, writing into the live
parameters, the kernels' inf/NaN count and thread setting (``methods.runtime``)."""

from __future__ import annotations

import pytest
import torch

from merge_core.errors import MergeError
from merge_core.materialize import merge_to_disk
from merge_core.methods import runtime, sparsify
from merge_core.recipe import Recipe
from merge_core.resident import CACHE_ENV, ResidentModels, cache_budget, count_nonfinite


def _recipe(zoo, method: str, **params) -> Recipe:
    layers = 2
    a = {"weight": [0.7, 1.3][:layers], "density": [0.3, 0.8][:layers], **params}
    b = {"weight": 0.4, "density": [0.9, 0.15][:layers], **params}
    return Recipe.from_dict({"merge_method": method, "base_model": str(zoo["base"]), "models": [
        {"model": str(zoo["ft_a"]), "parameters": a}, {"model": str(zoo["ft_b"]), "parameters": b}]})


def _resident(zoo, **kw) -> ResidentModels:
    return ResidentModels(str(zoo["base"]), [str(zoo["ft_a"]), str(zoo["ft_b"])], device="cpu", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sort_ascending_matches_torch_sort(dtype):
    a = (torch.randn(5000, dtype=torch.float64) * 3).to(dtype).abs()
    a[7], a[11], a[13] = float("inf"), 0.0, float("nan")
    got, want = runtime.sort_ascending(a), torch.sort(a).values
    assert got.dtype == dtype
    assert torch.equal(got[:-1], want[:-1]) and got[-1].isnan() and want[-1].isnan()


@pytest.mark.parametrize("kernels", ["numba", "torch"])
def test_cached_thresholds_are_the_computed_ones(monkeypatch, kernels):
    monkeypatch.setenv("BRMERGE_KERNELS", kernels)
    base = torch.randn(70_000)
    x = base + torch.randn(70_000) * 0.01
    delta = sparsify.Delta(x, base, torch.float32)
    ks = [1, 17, 35_000, 69_999, 70_000]
    computed = sparsify.kth_largest_abs(delta, ks)
    cache = runtime.MagnitudeCache(1 << 30)
    cache.register(x, base)
    with runtime.settings(cache=cache):
        cached = sparsify.kth_largest_abs(delta, ks)
    assert cache.used_bytes == x.numel() * 4
    assert [float(v) for v in cached] == [float(v) for v in computed]


def test_cache_serves_only_registered_tensors():
    base, x = torch.randn(1000), torch.randn(1000)
    cache = runtime.MagnitudeCache(1 << 30)
    cache.register(base)
    assert cache.sorted_abs(x, base) is None                    # x was never registered
    assert cache.sorted_abs(x.clone(), base) is None
    cache.register(x)
    assert cache.sorted_abs(x[::2], base[::2]) is None          # a strided view is another tensor
    assert cache.sorted_abs(x, base) is not None


def test_cache_keeps_to_its_budget():
    base, x, y = torch.randn(1000), torch.randn(1000), torch.randn(1000)
    cache = runtime.MagnitudeCache(4000)                        # room for one float32 tensor of 1000
    cache.register(base, x, y)
    assert cache.sorted_abs(x, base) is not None
    assert cache.sorted_abs(y, base) is None and cache.skipped == 1
    assert cache.used_bytes == 4000


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "task_arithmetic"])
def test_resident_with_cache_equals_disk_merge(tiny_zoo, tmp_path, method):
    from transformers import AutoModelForCausalLM

    extra = {"gamma": 0.05} if method == "breadcrumbs_ties" else {}
    recipe = _recipe(tiny_zoo, method, **extra)
    cached, plain = _resident(tiny_zoo), _resident(tiny_zoo, magnitude_cache_bytes=0)
    m1, m2 = cached.load_module(), plain.load_module()
    assert cached.materialize(recipe, m1) == 0 and plain.materialize(recipe, m2) == 0
    if method in ("ties", "breadcrumbs_ties"):
        assert cached.magnitudes.used_bytes > 0                # the thresholds came from the cache
    assert plain.magnitudes.used_bytes == 0
    merge_to_disk(recipe, tmp_path / "out", device="cpu", progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).state_dict()
    s1, s2 = m1.state_dict(), m2.state_dict()
    for name, p in loaded.items():
        assert torch.equal(s1[name], p) and torch.equal(s2[name], p), name


def test_resident_writes_into_the_live_parameters(tiny_zoo):
    resident = _resident(tiny_zoo)
    module = resident.load_module()
    before = {n: p.data_ptr() for n, p in module.named_parameters()}
    resident.materialize(_recipe(tiny_zoo, "ties"), module)
    first = {n: p.detach().clone() for n, p in module.named_parameters()}
    resident.materialize(_recipe(tiny_zoo, "dare_ties"), module)
    assert {n: p.data_ptr() for n, p in module.named_parameters()} == before
    assert any(not torch.equal(first[n], p) for n, p in module.named_parameters())


@pytest.mark.parametrize("kernels", ["numba", "torch"])
def test_resident_counts_every_non_finite_value(tiny_zoo, monkeypatch, kernels):
    monkeypatch.setenv("BRMERGE_KERNELS", kernels)
    resident = ResidentModels(str(tiny_zoo["base"]), [str(tiny_zoo["ft_a"])], device="cpu")
    module = resident.load_module()
    recipe = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": str(tiny_zoo["base"]),
                               "models": [{"model": str(tiny_zoo["ft_a"]), "parameters": {"weight": 1e39}}]})
    bad = resident.materialize(recipe, module)
    expected = sum(int((~torch.isfinite(p)).sum()) for p in module.parameters())
    assert bad == expected > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_count_nonfinite_kernel_matches_torch(dtype):
    t = torch.randn(100_003).to(dtype)
    t[::997] = float("inf")
    t[5::1009] = float("-inf")
    t[9::1013] = float("nan")
    assert count_nonfinite(t) == int((~torch.isfinite(t)).sum()) > 0


def test_kernels_take_the_resident_thread_count():
    from merge_core.devices import cpu_cores
    from merge_core.methods.kernels import threads

    for n in (1, 3):
        with runtime.settings(threads=n):
            assert threads.thread_count() == n
    assert threads.thread_count() == max(1, cpu_cores() - 1)   # unset: all cores but one


def test_cache_budget_setting(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_budget("2GB", cpu) == 2 * 10**9
    assert cache_budget(0, cpu) == 0 and cache_budget("0", cpu) == 0
    assert cache_budget(None, cpu) > 0                          # a share of the free memory
    monkeypatch.setenv(CACHE_ENV, "500MB")
    assert cache_budget(None, cpu) == 500 * 10**6
    monkeypatch.setenv(CACHE_ENV, "lots")
    with pytest.raises(MergeError, match=CACHE_ENV):
        cache_budget(None, cpu)


def test_resident_models_check_compatibility_up_front(tiny_zoo, tmp_path, monkeypatch):
    """The compatibility checks run directly (no probe recipe), before any tensor is read."""
    from merge_core import resident
    from search.demo.tiny import llama_config, make_llama

    other = make_llama(tmp_path / "wider", seed=5, config=llama_config(hidden=48),
                       tokenizer_dir=tiny_zoo["tokenizer"])
    reads = []
    monkeypatch.setattr(resident.TensorReader, "get", lambda self, *a, **k: reads.append(a))
    with pytest.raises(ValueError, match="wider"):
        ResidentModels(str(tiny_zoo["base"]), [str(tiny_zoo["ft_a"]), str(other)], device="cpu")
    assert reads == []
    monkeypatch.undo()
    fine = ResidentModels(str(tiny_zoo["base"]), [str(tiny_zoo["ft_a"])], device="cpu")
    assert fine.__dict__.get("_plans", {}) == {}             # nothing planned for the check


def _host_equals_device(zoo, device: str) -> None:
    recipe = _recipe(zoo, "ties")
    kw = {"device": device}
    on_device = ResidentModels(str(zoo["base"]), [str(zoo["ft_a"]), str(zoo["ft_b"])], **kw)
    on_host = ResidentModels(str(zoo["base"]), [str(zoo["ft_a"]), str(zoo["ft_b"])], keep="host", **kw)
    assert all(t.device.type == "cpu" for t in on_host.tensors[str(zoo["base"])].values())
    if device != "cpu":
        assert all(t.is_pinned() for t in on_host.tensors[str(zoo["ft_a"])].values())
    m1, m2 = on_device.load_module(), on_host.load_module()
    assert on_device.materialize(recipe, m1) == 0 and on_host.materialize(recipe, m2) == 0
    assert on_device.magnitudes.used_bytes > 0 and on_host.magnitudes is None  # host: no cache
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[n], s2[n]) for n in s1)


def test_sources_kept_on_the_host_merge_bit_identically(tiny_zoo):
    _host_equals_device(tiny_zoo, "cpu")
    with pytest.raises(MergeError, match="'device' or the 'host'"):
        _resident(tiny_zoo, keep="disk")


@pytest.mark.gpu
def test_sources_streamed_from_pinned_host_memory_merge_bit_identically_on_cuda(tiny_zoo):
    _host_equals_device(tiny_zoo, "cuda")


def test_live_model_in_the_compute_dtype_takes_the_merge_cast_once(tiny_zoo):
    resident = _resident(tiny_zoo)
    assert resident.checkpoint_dtype == torch.float32
    assert resident.compute_dtype("auto") == torch.float32 and resident.compute_dtype("bfloat16") == torch.bfloat16
    recipe = _recipe(tiny_zoo, "ties")
    full, half = resident.load_module(), resident.load_module(dtype=torch.bfloat16)
    resident.materialize(recipe, full)
    resident.materialize(recipe, half)
    assert next(half.parameters()).dtype == torch.bfloat16
    s32, s16 = full.state_dict(), half.state_dict()
    assert all(torch.equal(s32[n].to(torch.bfloat16), s16[n]) for n in s32)  # float32 merge, one cast


def test_a_deferred_magnitude_cache_is_sized_when_asked_and_merges_the_same(tiny_zoo):
    recipe = _recipe(tiny_zoo, "ties")
    deferred, now = _resident(tiny_zoo), _resident(tiny_zoo)
    deferred.defer_magnitude_cache()
    m1, m2 = deferred.load_module(), now.load_module()
    deferred.materialize(recipe, m1)
    now.materialize(recipe, m2)
    assert deferred.magnitudes is None and now.magnitudes.used_bytes > 0
    assert deferred.size_magnitude_cache() is deferred.magnitudes is not None
    deferred.materialize(recipe, m1)
    assert deferred.magnitudes.used_bytes > 0
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
