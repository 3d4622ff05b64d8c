"""Streaming merges to disk: sharding, loading back, atomic output, errors, randomized
reproducibility, the CLI, and the resident API."""

from __future__ import annotations

import contextvars
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from merge_core.errors import MergeError, RecipeError
from merge_core.io import (
    OutputTensor,
    ShardedWriter,
    TensorReader,
    load_state,
    parse_size,
    replace_output,
    weight_files,
)
from merge_core.materialize import (
    WORKERS_ENV,
    disk_workers,
    iter_merged,
    merge_to_disk,
    prepare,
    resolve_sources,
)
from merge_core.methods import runtime
from merge_core.recipe import Recipe
from merge_core.resident import ResidentModels


def _recipe(zoo, method="ties", **extra) -> Recipe:
    data = {
        "merge_method": method, "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["ft_a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(zoo["ft_b"]), "parameters": {"weight": [0.2, 0.9], "density": 0.7}}],
    }
    data.update(extra)
    return Recipe.from_dict(data)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("300kb") == 300_000
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_sharded_output_loads_with_transformers(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    summary = merge_to_disk(_recipe(tiny_zoo), out, device="cpu", shard_size="20KB", progress=False)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert summary.tensors == len(index["weight_map"])
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("Resposta correta:", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    merged = load_state(out)
    for name, p in model.state_dict().items():
        if name in merged:
            assert torch.equal(p, merged[name])
    assert (out / "mergekit_config.yml").is_file() and (out / "README.md").is_file()
    assert (out / "brmerge_provenance.json").is_file()


def test_sharding_does_not_change_values(tiny_zoo, tmp_path):
    merge_to_disk(_recipe(tiny_zoo), tmp_path / "one", device="cpu", progress=False)
    merge_to_disk(_recipe(tiny_zoo), tmp_path / "many", device="cpu", shard_size="10KB", progress=False)
    a, b = load_state(tmp_path / "one"), load_state(tmp_path / "many")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_writer_leaves_nothing_when_interrupted(tmp_path):
    outs = [OutputTensor(f"t{i}", (4, 4), torch.float32) for i in range(5)]
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(tmp_path / "out", outs, max_shard_bytes=100) as w:
            w.write("t0", torch.zeros(4, 4))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_then_replaced(tiny_zoo, tmp_path):
    out = tmp_path / "merged"
    merge_to_disk(_recipe(tiny_zoo), out, device="cpu", progress=False)
    with pytest.raises(ValueError, match="--overwrite"):
        merge_to_disk(_recipe(tiny_zoo), out, device="cpu", progress=False)
    merge_to_disk(_recipe(tiny_zoo, "task_arithmetic"), out, device="cpu", progress=False, overwrite=True)
    assert "task_arithmetic" in (out / "mergekit_config.yml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_randomized_merges_are_reproducible_in_any_order(method, tiny_zoo):
    recipe = _recipe(tiny_zoo, method, seed=5)
    sources = resolve_sources(recipe)
    plan = prepare(recipe, sources)
    readers = {r: TensorReader(s.weight_files) for r, s in sources.items()}

    def fetch(ref, name):
        return readers[ref].get(name)

    forward = {tp.name: t for tp, t in iter_merged(plan, fetch)}
    backward_plan = type(plan)(**{**plan.__dict__, "tensors": tuple(reversed(plan.tensors))})
    backward = {tp.name: t for tp, t in iter_merged(backward_plan, fetch, prefetch=False)}
    assert all(torch.equal(forward[k], backward[k]) for k in forward)
    other = prepare(_recipe(tiny_zoo, method, seed=6), sources)
    reseeded = {tp.name: t for tp, t in iter_merged(other, fetch)}
    assert any(not torch.equal(forward[k], reseeded[k]) for k in forward)


_CALLER = contextvars.ContextVar("test_caller", default=None)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "linear"])   # linear: the torch path
def test_workers_merge_the_same_tensors_in_plan_order(method, tiny_zoo):
    recipe = _recipe(tiny_zoo, method, seed=3) if method != "linear" else Recipe.from_dict({
        "merge_method": "linear", "models": [{"model": str(tiny_zoo[m]), "parameters": {"weight": w}}
                                             for m, w in (("ft_a", 0.3), ("ft_b", 0.7))]})
    sources = resolve_sources(recipe)
    plan = prepare(recipe, sources)
    readers = {r: TensorReader(s.weight_files) for r, s in sources.items()}
    seen = []

    def fetch(ref, name):
        seen.append((threading.current_thread().name, runtime.kernel_threads.get(), _CALLER.get()))
        return readers[ref].get(name)

    one = list(iter_merged(plan, fetch))
    seen.clear()
    token = _CALLER.set("caller's value")
    try:
        three = list(iter_merged(plan, fetch, workers=3))
    finally:
        _CALLER.reset(token)
    assert [tp.name for tp, _ in three] == [tp.name for tp in plan.tensors]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(one, three))
    # read and merged on the worker threads, kernels on one thread each, in the caller's context
    assert {thread.split("_")[0] for thread, _, _ in seen} == {"brmerge-merge"}
    assert len({thread for thread, _, _ in seen}) > 1
    assert {(threads, value) for _, threads, value in seen} == {(1, "caller's value")}


def test_workers_stop_at_the_first_error(tiny_zoo):
    recipe = _recipe(tiny_zoo)
    sources = resolve_sources(recipe)
    plan = prepare(recipe, sources)
    readers = {r: TensorReader(s.weight_files) for r, s in sources.items()}
    bad = plan.tensors[len(plan.tensors) // 2].name

    def fetch(ref, name):
        if name == bad:
            raise OSError(f"cannot read {name}")
        return readers[ref].get(name)

    got = []
    with pytest.raises(OSError, match="cannot read"):
        for tp, _ in iter_merged(plan, fetch, workers=2):
            got.append(tp.name)
    assert got == [tp.name for tp in plan.tensors[:len(plan.tensors) // 2]]
    assert not [t for t in threading.enumerate() if t.name.startswith("brmerge-merge")]


def test_disk_workers(monkeypatch):
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    monkeypatch.setattr("merge_core.materialize.cpu_cores", lambda: 2)
    assert disk_workers(torch.device("cpu")) == 2
    assert disk_workers(torch.device("cuda")) == 1
    monkeypatch.setattr("merge_core.materialize.cpu_cores", lambda: 32)
    assert disk_workers(torch.device("cpu")) == 1   # many cores: one tensor, kernels on all but one
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert disk_workers(torch.device("cpu")) == 3
    for bad in ("two", "0"):
        monkeypatch.setenv(WORKERS_ENV, bad)
        with pytest.raises(ValueError, match=WORKERS_ENV):
            disk_workers(torch.device("cpu"))


def test_incompatible_models_fail_before_any_work(tiny_zoo, tmp_path):
    from search.demo.tiny import llama_config, make_llama

    wide = make_llama(tmp_path / "wide", config=llama_config(hidden=48), tokenizer_dir=tiny_zoo["tokenizer"])
    recipe = Recipe.from_dict({"merge_method": "linear", "models": [
        {"model": str(tiny_zoo["base"]), "parameters": {"weight": 0.5}},
        {"model": str(wide), "parameters": {"weight": 0.5}}]})
    with pytest.raises(ValueError) as err:
        merge_to_disk(recipe, tmp_path / "out", device="cpu", progress=False)
    assert "wide" in str(err.value)
    assert not (tmp_path / "out").exists()


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], **kw)


def test_cli_merge_prints_summary(tiny_zoo, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(tiny_zoo).to_yaml())
    res = _cli("merge", str(recipe), "--out", str(tmp_path / "m"), "--device", "cpu", "--shard-size", "30KB")
    assert res.returncode == 0, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith("merged ") and " tensors, " in line and " s on cpu" in line
    assert (tmp_path / "m" / "config.json").is_file()


def test_cli_merge_starts_hashing_the_sources_before_the_merge(tiny_zoo, tmp_path):
    import argparse
    import hashlib

    from merge_core import provenance
    from search.commands import merge as merge_command

    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(tiny_zoo).to_yaml())
    merge_command._hash_sources_early(argparse.Namespace(recipe=recipe, allow_pickle=False,
                                                         trust_remote_code=False))
    files = [f for m in ("base", "ft_a", "ft_b") for f in weight_files(tiny_zoo[m])]
    assert all(provenance._file_key(f) in provenance._early for f in files)
    for f in files:   # the digests are the files' own (and taking them empties the queue)
        assert provenance.file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    # a recipe it cannot read is left to the real parse, which reports it
    for text in ("models: [", "- just a list", "models: [{model: 3}]"):
        recipe.write_text(text)
        merge_command._hash_sources_early(argparse.Namespace(recipe=recipe, allow_pickle=False,
                                                             trust_remote_code=False))


def test_cli_errors_are_one_line(tiny_zoo, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: tiez\nmodels: [{model: x}]\n")
    res = _cli("merge", str(bad), "--out", str(tmp_path / "m"))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "did you mean 'ties'" in res.stderr
    missing = _cli("merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "m"))
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_cli_refuses_pickle_without_flag(tiny_zoo, tmp_path):
    pick = tmp_path / "pickled"
    pick.mkdir()
    state = load_state(tiny_zoo["ft_a"])
    torch.save(state, pick / "pytorch_model.bin")
    (pick / "config.json").write_text((tiny_zoo["ft_a"] / "config.json").read_text())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(tiny_zoo["base"]), "parameters": {"weight": 0.5}},
        {"model": str(pick), "parameters": {"weight": 0.5}}]}))
    res = _cli("merge", str(recipe), "--out", str(tmp_path / "m"), "--device", "cpu")
    assert res.returncode == 2 and "--allow-pickle" in res.stderr
    ok = _cli("merge", str(recipe), "--out", str(tmp_path / "m"), "--device", "cpu", "--allow-pickle")
    assert ok.returncode == 0, ok.stderr
    merged = load_state(tmp_path / "m")
    base = load_state(tiny_zoo["base"])
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[name], (base[name] + state[name]) / 2)


def test_killed_merge_leaves_nothing_that_looks_finished(tmp_path):
    """SIGKILL in the middle of a merge: no folder under the output name."""
    from perf._common import write_synthetic_llama

    dims = dict(hidden=256, layers=6, intermediate=704, vocab=2000)
    base = write_synthetic_llama(tmp_path / "base", seed=0, base=None, **dims)
    ft = write_synthetic_llama(tmp_path / "ft", seed=1, base=base, **dims)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(ft), "parameters": {"weight": 1.0, "density": 0.3}}]}))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "search", "merge", str(recipe), "--out", str(out),
                             "--device", "cpu", "--shard-size", "200KB"],
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.partial") and any(p.iterdir())
                                             for p in tmp_path.iterdir()):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
    assert partial and not (partial[0] / "config.json").exists()


def test_resident_materialize_equals_disk_merge(tiny_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    resident = ResidentModels(str(tiny_zoo["base"]), [str(tiny_zoo["ft_a"]), str(tiny_zoo["ft_b"])],
                              device="cpu")
    module = resident.load_module()
    for method in ("ties", "dare_ties", "linear", "della"):
        extra = {"seed": 3}
        if method == "linear":
            recipe = Recipe.from_dict({"merge_method": "linear", "models": [
                {"model": str(tiny_zoo["ft_a"]), "parameters": {"weight": 0.3}},
                {"model": str(tiny_zoo["ft_b"]), "parameters": {"weight": 0.7}}]})
        else:
            recipe = _recipe(tiny_zoo, method, **extra)
        assert resident.materialize(recipe, module) == 0
        out = tmp_path / method
        merge_to_disk(recipe, out, device="cpu", progress=False)
        loaded = AutoModelForCausalLM.from_pretrained(str(out))
        live = module.state_dict()
        for name, p in loaded.state_dict().items():
            assert torch.equal(live[name], p), (method, name)


def test_resident_counts_non_finite_values(tiny_zoo):
    resident = ResidentModels(str(tiny_zoo["base"]), [str(tiny_zoo["ft_a"])], device="cpu")
    module = resident.load_module()
    recipe = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": str(tiny_zoo["base"]),
                               "models": [{"model": str(tiny_zoo["ft_a"]), "parameters": {"weight": 1e39}}]})
    assert resident.materialize(recipe, module) > 0


def test_resident_refuses_unknown_models(tiny_zoo):
    resident = ResidentModels(str(tiny_zoo["base"]), [str(tiny_zoo["ft_a"])], device="cpu")
    with pytest.raises(ValueError, match="resident models"):
        resident.plan(_recipe(tiny_zoo))


@pytest.mark.gpu
def test_cuda_merge_matches_cpu(tiny_zoo, tmp_path):
    for method in ("ties", "dare_ties", "della"):
        recipe = _recipe(tiny_zoo, method, seed=1)
        merge_to_disk(recipe, tmp_path / f"cpu-{method}", device="cpu", progress=False)
        merge_to_disk(recipe, tmp_path / f"gpu-{method}", device="cuda", progress=False)
        a, b = load_state(tmp_path / f"cpu-{method}"), load_state(tmp_path / f"gpu-{method}")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_random_masks_are_bit_identical_to_cpu():
    from merge_core import rng

    cpu = rng.uniform((257, 1031), seed=rng.derive_seed(3, "w"))
    gpu = rng.uniform((257, 1031), seed=rng.derive_seed(3, "w"), device="cuda").cpu()
    assert torch.equal(cpu, gpu)


@pytest.mark.gpu
def test_resident_on_cuda(tiny_zoo):
    resident = ResidentModels(str(tiny_zoo["base"]), [str(tiny_zoo["ft_a"]), str(tiny_zoo["ft_b"])],
                              device="cuda")
    module = resident.load_module()
    assert resident.materialize(_recipe(tiny_zoo), module) == 0
    assert next(module.parameters()).device.type == "cuda"


def test_weight_files_of_output(tiny_zoo, tmp_path):
    merge_to_disk(_recipe(tiny_zoo), tmp_path / "m", device="cpu", progress=False)
    assert [p.name for p in weight_files(tmp_path / "m")] == ["model.safetensors"]


# ---- output safety: what --overwrite may replace, non-finite outputs, SIGTERM, permissions ----

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_replaces_a_source_model(tiny_zoo, tmp_path):
    """``merge --out <base model> --overwrite`` used to replace the base model's weights."""
    base = tmp_path / "base"
    shutil.copytree(tiny_zoo["base"], base)
    before = _snapshot(base)
    recipe = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": str(base),
                               "models": [{"model": str(tiny_zoo["ft_a"]), "parameters": {"weight": 0.5}}]})
    with pytest.raises(MergeError, match="source model"):
        merge_to_disk(recipe, base, device="cpu", progress=False, overwrite=True)
    with pytest.raises(MergeError, match="source model"):      # a folder that contains a source
        merge_to_disk(recipe, tmp_path, device="cpu", progress=False, overwrite=True)
    assert _snapshot(base) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_never_replaces_the_working_directory_or_a_stranger(tiny_zoo, tmp_path, monkeypatch):
    """``merge --out . --overwrite`` used to delete an unrelated file in the working directory."""
    work = tmp_path / "work"
    (work / "inner").mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work / "inner")
    for target in (work / "inner", work, Path(".")):
        with pytest.raises(MergeError, match="working directory"):
            merge_to_disk(_recipe(tiny_zoo), target, device="cpu", progress=False, overwrite=True)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "data.bin").write_bytes(b"x")
    with pytest.raises(MergeError, match="not a brmerge output"):
        merge_to_disk(_recipe(tiny_zoo), stranger, device="cpu", progress=False, overwrite=True)
    (tmp_path / "file").write_text("a file")
    with pytest.raises(MergeError, match="not a folder brmerge wrote"):
        merge_to_disk(_recipe(tiny_zoo), tmp_path / "file", device="cpu", progress=False, overwrite=True)
    assert (work / "notes.txt").read_text() == "keep me" and (stranger / "data.bin").read_bytes() == b"x"
    assert (tmp_path / "file").read_text() == "a file"


def test_replace_output_protects_a_campaign_and_swaps(tiny_zoo, tmp_path):
    """An export onto a folder the campaign uses was replaced; the export's swap (``replace_output``)
    now refuses protected folders, and replaces an earlier output by moving it aside first."""
    campaign = tmp_path / "campaign"
    earlier = campaign / "exports" / "best"
    merge_to_disk(_recipe(tiny_zoo), earlier, device="cpu", progress=False)
    new = tmp_path / ".new"
    new.mkdir()
    (new / "model.safetensors").write_bytes(b"new")
    with pytest.raises(MergeError, match="campaign"):
        replace_output(new, campaign, overwrite=True, protected=[campaign])
    with pytest.raises(MergeError, match="campaign"):
        replace_output(new, campaign / "exports", overwrite=True, protected=[campaign / "exports" / "best"])
    with pytest.raises(MergeError, match="already exists"):
        replace_output(new, earlier, overwrite=False, protected=[campaign])
    assert (earlier / "brmerge_provenance.json").is_file()
    # a rename that fails puts the earlier output back
    with pytest.raises(OSError):
        replace_output(tmp_path / "missing", earlier, overwrite=True)
    assert (earlier / "brmerge_provenance.json").is_file()
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["best"]
    assert replace_output(new, earlier, overwrite=True, protected=[campaign / "campaign.yaml"]) == earlier
    assert (earlier / "model.safetensors").read_bytes() == b"new" and not new.exists()
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["best"]


def test_export_refuses_a_fine_tune_of_the_campaign(tiny_zoo, tmp_path, monkeypatch):
    """``export --out <a fine-tune the campaign merges> --overwrite`` replaced that model."""
    import optuna

    from search import export, trials

    ft = tmp_path / "ft_a"
    shutil.copytree(tiny_zoo["ft_a"], ft)
    (ft / "brmerge_provenance.json").write_text('{"schema": "brmerge-provenance/1"}')  # even a merge
    before = _snapshot(ft)
    recipe = _recipe({**tiny_zoo, "ft_a": ft}).to_yaml()
    trial = optuna.trial.create_trial(value=0.5, user_attrs={trials.A_RECIPE: recipe})
    monkeypatch.setattr(export, "load_study", lambda directory: None)
    monkeypatch.setattr(export, "load_campaign", lambda path: None)
    monkeypatch.setattr(export, "pick_trial", lambda study, number: trial)
    campaign = tmp_path / "camp"
    campaign.mkdir()
    for target in (ft, campaign):
        with pytest.raises(MergeError, match="source model or campaign"):
            export.export_trial(campaign, out=target, device="cpu", overwrite=True, progress=False)
    assert _snapshot(ft) == before


def test_non_finite_merge_is_refused_and_leaves_nothing(tiny_zoo, tmp_path):
    """A weight of 1e300 gave an all-inf model and exit status 0."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(tiny_zoo["base"]),
                                      "models": [{"model": str(tiny_zoo["ft_a"]), "parameters": {"weight": 1e300}}]}))
    res = _cli("merge", str(recipe), "--out", str(tmp_path / "m"), "--device", "cpu", "--quiet")
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "inf/NaN" in res.stderr and "tensor 'model." in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_sigterm_removes_the_partial_output(tmp_path):
    """SIGTERM in the middle of a merge left its ``.partial-*`` folder behind."""
    from perf._common import write_synthetic_llama

    dims = dict(hidden=256, layers=6, intermediate=704, vocab=2000)
    base = write_synthetic_llama(tmp_path / "base", seed=0, base=None, **dims)
    ft = write_synthetic_llama(tmp_path / "ft", seed=1, base=base, **dims)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base), "models": [
        {"model": str(ft), "parameters": {"weight": 1.0, "density": 0.3}}]}))
    out = tmp_path / "out"
    # the writer slowed down (our class, in the child only), so the merge is surely under way
    script = ("import sys, time\n"
              "from merge_core import io\n"
              "write = io.ShardedWriter.write\n"
              "def slow(self, name, t):\n"
              "    write(self, name, t)\n"
              "    time.sleep(0.2)\n"
              "io.ShardedWriter.write = slow\n"
              "from search.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, "merge", str(recipe), "--out", str(out),
                             "--device", "cpu", "--shard-size", "200KB", "--quiet"],
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".out.partial") and any(p.iterdir())
                                             for p in tmp_path.iterdir()):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_output_has_the_usual_permissions(tiny_zoo, tmp_path):
    """The output folder was 0700 (from mkdtemp) whatever the umask."""
    old = os.umask(0o022)
    try:
        out = merge_to_disk(_recipe(tiny_zoo), tmp_path / "m", device="cpu", progress=False).out_dir
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}


def test_cli_exits_normally(tiny_zoo, tmp_path):
    """``merge`` ended with ``os._exit``, skipping interpreter shutdown (atexit handlers)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(tiny_zoo).to_yaml())
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print('atexit ran', flush=True))\n"
              "sys.argv = ['brmerge'] + sys.argv[1:]\n"
              "from search.cli import entry\n"
              "entry()\n")
    res = subprocess.run([sys.executable, "-c", script, "merge", str(recipe), "--out", str(tmp_path / "m"),
                          "--device", "cpu", "--quiet"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[-1] == "atexit ran"


def test_recipe_structure_reads_without_torch(tiny_zoo, tmp_path):
    """The early hashing reads the recipe with ``Recipe`` itself (no second parser), and
    neither that nor the registry's names import torch."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_recipe(tiny_zoo).to_yaml())
    script = ("import sys\n"
              "from merge_core import methods\n"
              "from merge_core.recipe import Recipe\n"
              "refs = Recipe.from_file(sys.argv[1], check_params=False).referenced_models()\n"
              "assert 'ties' in methods.names()\n"
              "import argparse, pathlib\n"
              "from search.commands import merge\n"
              "merge._hash_sources_early(argparse.Namespace(recipe=pathlib.Path(sys.argv[1]), allow_pickle=False,\n"
              "                                             trust_remote_code=False))\n"
              "print(len(refs), 'torch' in sys.modules)\n")
    res = subprocess.run([sys.executable, "-c", script, str(recipe)], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["3", "False"]
    with pytest.raises(RecipeError, match="did you mean 'ties'"):
        Recipe.from_yaml("merge_method: tiez\nmodels: [{model: a}]\n", check_params=False)
