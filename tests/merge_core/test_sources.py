"""Resolving model references: local folders, a Hugging Face cache laid out on disk, refusals."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from merge_core.sources import ModelSource, SourceError, hub_repo_id, resolve_model
from search.demo.tiny import make_llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def fake_hub_snapshot(cache: Path, repo_id: str, model_dir: Path, *, commit: str = COMMIT,
                      refs: tuple[str, ...] = ("main",),
                      blob_names: dict[str, str] | None = None) -> Path:
    """Lay ``model_dir``'s files out the way huggingface_hub caches a downloaded snapshot.

    LFS files (weights) become ``blobs/<sha256>``, other files ``blobs/<git sha1>``; the snapshot
    holds relative symlinks to them. ``blob_names`` overrides a file's blob name.
    """
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    for name in refs:
        (repo / "refs" / name).write_text(commit)
    for file in sorted(p for p in model_dir.iterdir() if p.is_file()):
        data = file.read_bytes()
        if file.suffix in (".safetensors", ".bin"):
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = (blob_names or {}).get(file.name, blob)
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    return snapshot


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _pickle_model(src: Path, dst: Path, *, shards: int = 1) -> Path:
    """A model folder with only pytorch_model*.bin weights, built from a safetensors one."""
    from safetensors.torch import load_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(src / "model.safetensors")
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, dst / fname)
        weight_map.update(dict.fromkeys(part, fname))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dst


def _header_names(files) -> set[str]:
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            names.update(st.keys())
    return names


# --- local folders ---------------------------------------------------------------------------

def test_local_folder_single_safetensors(tiny_zoo):
    src = resolve_model(str(tiny_zoo["base"]))
    assert src.path == tiny_zoo["base"].resolve()
    assert src.revision is None
    assert src.format == "safetensors"
    assert src.weight_files == (src.path / "model.safetensors",)
    assert src.config["model_type"] == "llama"
    files = src.tensor_files()
    assert set(files) == _header_names(src.weight_files)
    assert "model.layers.3.mlp.down_proj.weight" in files
    assert set(files.values()) == {src.path / "model.safetensors"}


def test_source_is_hashable_and_picklable(tiny_zoo):
    src = resolve_model(str(tiny_zoo["ft_a"]))
    again = pickle.loads(pickle.dumps(src))
    assert again == src and hash(again) == hash(src)
    assert again.config == src.config


def test_home_is_expanded(tiny_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _copy(tiny_zoo["base"], tmp_path / "m")
    src = resolve_model("~/m")
    assert src.path == (tmp_path / "m").resolve()
    assert src.ref == "~/m"


def test_sharded_safetensors_use_the_index(tiny_zoo, tmp_path):
    out = make_llama(tmp_path / "sharded", seed=5, like=tiny_zoo["base"], max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    src = resolve_model(str(out))
    assert [p.name for p in src.weight_files] == shards
    files = src.tensor_files()
    assert {n: p.name for n, p in files.items()} == index["weight_map"]
    for name, path in list(files.items())[:5]:
        with safe_open(str(path), framework="pt") as st:
            assert name in st.keys()


def test_unindexed_shards_are_read_from_headers(tiny_zoo, tmp_path):
    out = make_llama(tmp_path / "sharded", seed=5, like=tiny_zoo["base"], max_shard_size="40KB")
    (out / "model.safetensors.index.json").unlink()
    src = resolve_model(str(out))
    assert len(src.weight_files) > 1
    assert list(src.weight_files) == sorted(out.resolve().glob("*.safetensors"))
    files = src.tensor_files()
    assert set(files) == _header_names(src.weight_files)
    for name, path in files.items():
        with safe_open(str(path), framework="pt") as st:
            assert name in st.keys()


def test_index_listing_a_missing_shard_is_refused(tiny_zoo, tmp_path):
    out = make_llama(tmp_path / "sharded", seed=5, like=tiny_zoo["base"], max_shard_size="40KB")
    victim = sorted(out.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(SourceError, match=rf"{victim.name}.*missing.*re-download"):
        resolve_model(str(out))


def test_git_checkout_records_head(tiny_zoo, tmp_path):
    model = _copy(tiny_zoo["base"], tmp_path / "checkout")
    (model / ".git" / "refs" / "heads").mkdir(parents=True)
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (model / ".git" / "refs" / "heads" / "main").write_text(OTHER_COMMIT + "\n")
    assert resolve_model(str(model)).revision == OTHER_COMMIT


def test_revision_for_a_local_folder_is_refused(tiny_zoo):
    with pytest.raises(SourceError, match=r"is a local folder, so revision 'v1' cannot be applied"):
        resolve_model(str(tiny_zoo["base"]), revision="v1")


# --- refusals --------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    ref = str(tmp_path / "nope")
    with pytest.raises(SourceError, match=r"model folder '.*nope' not found: check the path"):
        resolve_model(ref)


def test_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(SourceError, match=r"'.*m' has no config.json"):
        resolve_model(str(tmp_path / "m"))


def test_folder_without_weights(tiny_zoo, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(tiny_zoo["base"] / "config.json", model)
    with pytest.raises(SourceError, match=r"'.*m' has no weights"):
        resolve_model(str(model))


@pytest.mark.parametrize("shards", [1, 2])
def test_pickle_only_needs_opt_in(tiny_zoo, tmp_path, shards):
    model = _pickle_model(tiny_zoo["base"], tmp_path / "pkl", shards=shards)
    named = "pytorch_model.bin" if shards == 1 else "pytorch_model.bin.index.json"
    with pytest.raises(SourceError) as err:
        resolve_model(str(model))
    msg = str(err.value)
    assert f"'{model}'" in msg and named in msg and "--allow-pickle" in msg
    assert "safetensors" in msg and "\n" not in msg

    src = resolve_model(str(model), allow_pickle=True)
    assert src.format == "pickle"
    assert len(src.weight_files) == shards
    assert set(src.tensor_files()) == _header_names([tiny_zoo["base"] / "model.safetensors"])


def test_safetensors_preferred_over_pickle(tiny_zoo, tmp_path):
    model = _copy(tiny_zoo["base"], tmp_path / "both")
    torch.save({"x": torch.zeros(1)}, model / "pytorch_model.bin")
    src = resolve_model(str(model), allow_pickle=True)
    assert src.format == "safetensors"
    assert src.weight_files == (model.resolve() / "model.safetensors",)


def test_remote_code_needs_opt_in(tiny_zoo, tmp_path):
    model = _copy(tiny_zoo["base"], tmp_path / "custom")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceError, match=r"'.*custom' needs custom code.*--trust-remote-code"):
        resolve_model(str(model))
    assert resolve_model(str(model), trust_remote_code=True).config["auto_map"]


# --- the Hugging Face cache ------------------------------------------------------------------

def test_hub_id_resolves_from_the_cache_offline(tiny_zoo, tmp_path, offline):
    cache = tmp_path / "hub"
    snapshot = fake_hub_snapshot(cache, "org/tiny", tiny_zoo["ft_a"])
    src = resolve_model("org/tiny", cache_dir=cache)
    assert src.ref == "org/tiny"
    assert src.revision == COMMIT
    assert src.path == snapshot.resolve()
    assert src.weight_files == (src.path / "model.safetensors",)
    assert src.weight_files[0].is_symlink()  # kept as the snapshot entry, not the blob
    assert src.config == json.loads((tiny_zoo["ft_a"] / "config.json").read_text())
    assert hub_repo_id(src.path) == "org/tiny"
    assert set(src.tensor_files()) == _header_names([tiny_zoo["ft_a"] / "model.safetensors"])


def test_hub_revision_by_tag_and_by_commit(tiny_zoo, tmp_path, offline):
    cache = tmp_path / "hub"
    fake_hub_snapshot(cache, "org/tiny", tiny_zoo["ft_a"], commit=COMMIT, refs=("main",))
    fake_hub_snapshot(cache, "org/tiny", tiny_zoo["ft_b"], commit=OTHER_COMMIT, refs=("v1",))
    assert resolve_model("org/tiny", cache_dir=cache).revision == COMMIT
    tagged = resolve_model("org/tiny@v1", cache_dir=cache)
    assert tagged.revision == OTHER_COMMIT and tagged.ref == "org/tiny@v1"
    pinned = resolve_model("org/tiny", revision=OTHER_COMMIT, cache_dir=cache)
    assert pinned.path.name == OTHER_COMMIT
    with pytest.raises(SourceError, match=r"'org/tiny@v1' names revision 'v1'.*keep only one"):
        resolve_model("org/tiny@v1", revision="main", cache_dir=cache)


def test_hub_snapshot_folder_given_as_path_keeps_its_commit(tiny_zoo, tmp_path):
    snapshot = fake_hub_snapshot(tmp_path / "hub", "org/tiny", tiny_zoo["ft_a"])
    assert resolve_model(str(snapshot)).revision == COMMIT


def test_hub_id_missing_from_cache_offline(tmp_path, offline):
    with pytest.raises(SourceError) as err:
        resolve_model("org/absent", cache_dir=tmp_path / "hub")
    msg = str(err.value)
    assert "'org/absent'" in msg and "offline" in msg and "hf download org/absent" in msg


def test_hub_pickle_only_is_refused(tiny_zoo, tmp_path, offline):
    model = _pickle_model(tiny_zoo["base"], tmp_path / "pkl")
    cache = tmp_path / "hub"
    fake_hub_snapshot(cache, "org/pkl", model)
    with pytest.raises(SourceError, match=r"'org/pkl' has only pickle weights.*--allow-pickle"):
        resolve_model("org/pkl", cache_dir=cache)
    assert resolve_model("org/pkl", cache_dir=cache, allow_pickle=True).format == "pickle"


def test_source_error_is_a_value_error():
    assert issubclass(SourceError, ValueError)
    assert ModelSource.__dataclass_params__.frozen  # type: ignore[attr-defined]

