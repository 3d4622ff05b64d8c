"""Inputs that exhaust memory or end in a traceback: YAML alias bombs, non-UTF-8 files, a
full disk, staging folders of killed runs, remote-code sources, impossible few-shot counts."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from merge_core.errors import BrmergeError, MergeError, RecipeError
from merge_core.io import OutputTensor, ShardedWriter
from merge_core.materialize import merge_to_disk
from merge_core.recipe import Recipe
from merge_core.safe_yaml import MAX_EXPANDED_VALUES, expanded_size
from merge_core.sources import SourceError, resolve_model
from merge_core.staging import _HOST, remove_stale_staging

ROOT = Path(__file__).resolve().parents[2]

BOMB = "\n".join(["a0: &a0 [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]"]
                 + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)])


def _linear(zoo, weight: str = "0.5") -> str:
    return (f"merge_method: linear\nmodels:\n  - model: {zoo['base']}\n    parameters: {{weight: {weight}}}\n"
            f"  - model: {zoo['ft_a']}\n    parameters: {{weight: 0.5}}\n")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "search", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


# --- YAML alias bombs -------------------------------------------------------------------

def test_alias_bomb_recipe_is_refused_in_bounded_time():
    text = BOMB + "\nmerge_method: linear\nmodels:\n  - model: x\n    parameters: {weight: *a9}\n"
    start = time.monotonic()
    with pytest.raises(RecipeError, match="alias bomb") as err:
        Recipe.from_yaml(text, source="bomb.yaml")
    assert time.monotonic() - start < 5 and "\n" not in str(err.value)


def test_alias_cycle_is_refused():
    with pytest.raises(RecipeError, match="cycle"):
        Recipe.from_yaml("merge_method: linear\nmodels: &m [{model: x, parameters: {weight: *m}}]\n")


def test_ordinary_anchors_are_kept(tiny_zoo):
    text = (f"merge_method: ties\nbase_model: {tiny_zoo['base']}\nmodels:\n"
            f"  - model: {tiny_zoo['ft_a']}\n    parameters: &p {{weight: 0.5, density: 0.5}}\n"
            f"  - model: {tiny_zoo['ft_b']}\n    parameters: *p\n")
    recipe = Recipe.from_yaml(text)
    assert recipe.models[0].parameters == recipe.models[1].parameters


def test_expanded_size_counts_every_reference():
    shared = [1, 2, 3]
    assert expanded_size({"a": shared, "b": shared}) == 1 + 2 + 2 * 4
    assert expanded_size(yaml.safe_load(BOMB)) > MAX_EXPANDED_VALUES


def test_alias_bomb_campaign_is_refused(tmp_path):
    from search.campaign import CampaignError, load_campaign

    path = tmp_path / "campaign.yaml"
    path.write_text(BOMB + "\nsearch: {trials: *a9}\n")
    with pytest.raises(CampaignError, match="alias bomb"):
        load_campaign(path)


# --- non-UTF-8 files --------------------------------------------------------------------

def test_non_utf8_recipe_is_one_line_exit_2(tiny_zoo, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(_linear(tiny_zoo).encode() + b"# pe\xe7a\n")   # latin-1, not UTF-8
    res = _cli("merge", str(recipe), "--out", str(tmp_path / "m"), "--device", "cpu")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "not UTF-8" in res.stderr and "r.yaml line 7:" in res.stderr


def test_non_utf8_campaign_is_one_line(tmp_path):
    from search.campaign import CampaignError, load_campaign

    path = tmp_path / "campaign.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    with pytest.raises(CampaignError, match=r"line 1: campaign file is not UTF-8"):
        load_campaign(path)


def test_non_utf8_jsonl_names_the_line(tmp_path):
    from benchmarks_ptbr.items import DataError, read_jsonl

    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"id": "a"}\n\n{"id": "b\xe9"}\n')
    rows = read_jsonl(path)
    assert next(rows) == (1, {"id": "a"})
    with pytest.raises(DataError, match=r"x.jsonl:3: not UTF-8 text \(byte 0xe9 at column 10\)"):
        next(rows)


# --- a full disk ------------------------------------------------------------------------

def _outputs() -> list[OutputTensor]:
    return [OutputTensor(f"t{i}", (256, 256), torch.float32) for i in range(4)]   # 256 KiB each


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    class FullDisk:   # a file object on a disk with no room left
        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "out"
    with ShardedWriter(out, _outputs(), max_shard_bytes=10**9) as writer:
        writer.write("t0", torch.ones(256, 256))
        writer._handle = FullDisk()
        with pytest.raises(MergeError, match=r"the disk filled while writing .*out .*needs 1,048,576 bytes"):
            writer.write("t1", torch.ones(256, 256))
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_full_tmpfs_during_a_merge(tiny_zoo, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(_linear(tiny_zoo))
        res = _cli("merge", str(recipe), "--out", str(mount / "m"), "--device", "cpu", "--quiet")
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert "the disk filled while writing" in res.stderr and str(mount / "m") in res.stderr
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=True)


# --- staging folders of killed runs -------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_of_dead_processes_is_removed(tmp_path):
    out = tmp_path / "out"
    dead, live = _dead_pid(), os.getpid()
    names = {
        "dead_partial": f".out.partial-{_HOST}-{dead}-0123abcd",
        "dead_export": f".out.export-{_HOST}-{dead}-89abcdef",
        "dead_merge_in_export": f"..out.export-{_HOST}-{dead}-89abcdef.partial-{_HOST}-{dead}-00001111",
        "live": f".out.export-{_HOST}-{live}-aaaabbbb",
        "other_host": f".out.partial-otherhost-{dead}-ccccdddd",
        "other_output": f".outer.partial-{_HOST}-{dead}-eeeeffff",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")   # complete-looking
    removed = remove_stale_staging(out)
    left = {p.name for p in tmp_path.iterdir()}
    assert {p.name for p in removed} == {names["dead_partial"], names["dead_export"], names["dead_merge_in_export"]}
    assert left == {names["live"], names["other_host"], names["other_output"]}


def test_a_merge_removes_the_staging_a_killed_merge_left(tiny_zoo, tmp_path):
    stale = tmp_path / f".m.partial-{_HOST}-{_dead_pid()}-0123abcd"
    shutil.copytree(tiny_zoo["base"], stale)
    merge_to_disk(Recipe.from_yaml(_linear(tiny_zoo)), tmp_path / "m", device="cpu", progress=False)
    assert not stale.exists() and (tmp_path / "m" / "config.json").is_file()


# --- pickle hint, remote code, few-shot counts -----------------------------------------------

def test_pickle_hint_names_the_command_that_has_the_flag(tiny_zoo, tmp_path):
    model = tmp_path / "pkl"
    shutil.copytree(tiny_zoo["base"], model)
    (model / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, model / "pytorch_model.bin")
    with pytest.raises(SourceError, match=r"convert it to safetensors \(only `brmerge merge` reads pickle, "
                                          r"with --allow-pickle"):
        resolve_model(str(model))


def test_remote_code_merge_carries_the_code_files(tiny_zoo, tmp_path):
    base = tmp_path / "custom"
    shutil.copytree(tiny_zoo["base"], base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
                          "AutoModel": "other/repo--modeling_x.X"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "configuration_custom.py").write_text("raise SystemExit('never imported by a merge')\n")
    (base / "modeling_custom.py").write_text("raise SystemExit('never imported by a merge')\n")
    (base / "unrelated.py").write_text("")
    recipe = Recipe.from_yaml(f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n"
                              f"  - model: {tiny_zoo['ft_a']}\n    parameters: {{weight: 0.5}}\n")
    with pytest.raises(SourceError, match="--trust-remote-code"):
        merge_to_disk(recipe, tmp_path / "m", device="cpu", progress=False)
    out = merge_to_disk(recipe, tmp_path / "m", device="cpu", progress=False, trust_remote_code=True).out_dir
    assert json.loads((out / "config.json").read_text())["auto_map"] == config["auto_map"]
    for name in ("configuration_custom.py", "modeling_custom.py"):
        assert (out / name).read_text() == (base / name).read_text()
    assert not (out / "unrelated.py").exists()


def test_too_many_shots_say_how_many_items_there_are():
    from benchmarks_ptbr.suite import load_suite

    with pytest.raises(BrmergeError, match=r"num_fewshot=100000 needs 100000 legal shots .* has \d+ usable"):
        load_suite(split="test", source="sample", domains=["legal"], num_fewshot=100000)
    dev = load_suite(split="dev", source="sample", domains=["legal"], num_fewshot=0).tasks[0]
    every = len(dev.items)
    with pytest.raises(BrmergeError, match=rf"has {every} usable legal items and num_fewshot={every} takes"):
        load_suite(split="dev", source="sample", domains=["legal"], num_fewshot=every)
