"""Provenance manifest and model card: every source, licence and weight-file sha256, disclosed."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from merge_core import provenance
from merge_core.provenance import (
    build_provenance,
    escape_markdown,
    file_sha256,
    hash_in_background,
    sha256_file,
    source_licence,
    write_model_card,
)
from merge_core.sources import resolve_model
from tests.merge_core.test_sources import COMMIT, fake_hub_snapshot

RECIPE_YAML = """\
merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {b}
    parameters: {{weight: [0.2, 0.8], density: 0.5}}
dtype: float32
"""
TIES_URL = "https://arxiv.org/abs/2306.01708"


def _card(licence: str | None, **extra: str) -> str:
    if licence is None:
        return "# A model card without front matter\n"
    fields = {"license": licence, **extra, "language": ["pt"]}
    return f"---\n{yaml.safe_dump(fields)}---\n\n# Model\n"


def _with_card(src: Path, dst: Path, card: str) -> Path:
    shutil.copytree(src, dst)
    (dst / "README.md").write_text(card)
    return dst


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n", 2)[1])


def _yaml_block(readme: str) -> str:
    return readme.split("```yaml\n", 1)[1].split("\n```", 1)[0]


def _provenance(base, models, recipe_yaml: str, **kwargs):
    return build_provenance(recipe=yaml.safe_load(recipe_yaml), recipe_yaml=recipe_yaml,
                            method="ties", method_title="TIES-Merging",
                            method_reference=TIES_URL, base_model=base, models=models, **kwargs)


@pytest.fixture
def licensed(tiny_zoo, tmp_path) -> dict[str, Path]:
    return {
        "base": _with_card(tiny_zoo["base"], tmp_path / "base", _card("apache-2.0")),
        "ft_a": _with_card(tiny_zoo["ft_a"], tmp_path / "ft_a", _card("apache-2.0")),
        "ft_b": _with_card(tiny_zoo["ft_b"], tmp_path / "ft_b", _card("apache-2.0")),
        "llama": _with_card(tiny_zoo["ft_c"], tmp_path / "llama",
                            _card("other", license_name="llama3",
                                  license_link="https://llama.meta.com/llama3/license")),
        "unknown": _with_card(tiny_zoo["ft_c"], tmp_path / "unknown", _card(None)),
    }


def test_sha256_file_matches_hashlib(tiny_zoo):
    weights = tiny_zoo["base"] / "model.safetensors"
    assert sha256_file(weights) == _sha(weights)
    assert sha256_file(weights, chunk=4096) == _sha(weights)  # several chunks


def test_file_sha256_takes_the_lfs_blob_name_without_rehashing(tiny_zoo, tmp_path):
    # Deliberately not the content's hash: getting it back proves nothing was rehashed.
    fake = "ab" * 32
    snapshot = fake_hub_snapshot(tmp_path / "hub", "org/tiny", tiny_zoo["ft_a"],
                                 blob_names={"model.safetensors": fake})
    assert file_sha256(snapshot / "model.safetensors") == fake
    # A git-sha1 blob (small non-LFS file) is hashed for real.
    config = snapshot / "config.json"
    assert config.is_symlink() and file_sha256(config) == _sha(config)
    # So is a plain file.
    assert file_sha256(tiny_zoo["ft_a"] / "model.safetensors") == _sha(
        tiny_zoo["ft_a"] / "model.safetensors")


def test_sha256_file_of_an_empty_file(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()


def test_digests_hashed_in_background_are_taken_once(tmp_path, monkeypatch):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"a" * 100_000)
    b.write_bytes(b"b" * 5000)
    hash_in_background([a, b, tmp_path / "missing.safetensors"])
    for path in (a, b):
        key = provenance._file_key(path)
        provenance._early[key].result(timeout=30)   # finished: file_sha256 must not read again
    real = provenance.sha256_file
    monkeypatch.setattr(provenance, "sha256_file", lambda path: pytest.fail(f"{path} hashed again"))
    assert file_sha256(a) == _sha(a)
    # b changed after it was hashed (new size): its early digest is stale and not used
    b.write_bytes(b"c" * 6000)
    monkeypatch.setattr(provenance, "sha256_file", real)
    assert file_sha256(b) == _sha(b)
    # each early digest serves one file_sha256; later calls hash as usual
    assert provenance._file_key(a) not in provenance._early
    assert file_sha256(a) == _sha(a)


def test_file_sha256_ignores_64_hex_names_outside_a_cache(tiny_zoo, tmp_path):
    blob = tmp_path / ("cd" * 32)
    shutil.copy(tiny_zoo["base"] / "model.safetensors", blob)
    link = tmp_path / "model.safetensors"
    link.symlink_to(blob)
    assert file_sha256(link) == _sha(blob)


def test_source_licence(licensed):
    assert source_licence(resolve_model(str(licensed["base"]))) == "apache-2.0"
    assert source_licence(resolve_model(str(licensed["llama"]))) == "llama3"
    assert source_licence(resolve_model(str(licensed["unknown"]))) is None


def test_shared_licence_card_and_manifest(licensed, tmp_path):
    base, a, b = (resolve_model(str(licensed[k])) for k in ("base", "ft_a", "ft_b"))
    recipe_yaml = RECIPE_YAML.format(base=base.ref, a=a.ref, b=b.ref)
    prov = _provenance(base, [a, b], recipe_yaml, outputs={"model.safetensors": "f" * 64},
                       extra={"scores": {"enem_dev": 0.42}})
    out = tmp_path / "out"
    write_model_card(out, prov, title="Tiny TIES", extra_sections=[("Scores", "ENEM dev: 0.42")])

    readme = (out / "README.md").read_text()
    front = _front_matter(readme)
    assert front["base_model"] == [base.ref, a.ref, b.ref]
    assert front["tags"] == ["merge", "brmerge"]
    assert front["library_name"] == "transformers"
    assert front["license"] == "apache-2.0"
    assert "license_name" not in front

    assert "# Tiny TIES" in readme
    assert "**merge** of existing pretrained models" in readme
    assert "not trained from scratch" in readme.replace("\n", " ")
    assert f"**TIES-Merging** (`ties`) ([paper]({TIES_URL}))" in readme
    assert _yaml_block(readme) == recipe_yaml.rstrip("\n")
    assert yaml.safe_load(_yaml_block(readme)) == prov["recipe"]
    for src, role in [(base, "base"), (a, "model"), (b, "model")]:
        weights = src.path / "model.safetensors"
        row = (f"| {role} | {escape_markdown(src.ref)} | local folder | apache-2.0 | model.safetensors | "
               f"`{_sha(weights)}` |")
        assert row in readme
    assert f"| model.safetensors | `{'f' * 64}` |" in readme
    assert readme.rstrip().endswith("## Scores\n\nENEM dev: 0.42")

    manifest = json.loads((out / "brmerge_provenance.json").read_text())
    assert manifest == prov  # round-trips
    assert manifest["schema"] == "brmerge-provenance/1"
    assert manifest["brmerge_version"]
    assert manifest["created"].endswith("Z")
    assert manifest["method"] == {"name": "ties", "title": "TIES-Merging", "reference": TIES_URL}
    assert manifest["recipe_yaml"] == recipe_yaml
    assert manifest["outputs"] == {"model.safetensors": "f" * 64}
    assert manifest["extra"] == {"scores": {"enem_dev": 0.42}}
    assert [s["role"] for s in manifest["sources"]] == ["base", "model", "model"]
    for entry, src in zip(manifest["sources"], [base, a, b]):
        weights = src.path / "model.safetensors"
        assert entry["ref"] == src.ref and entry["revision"] is None
        assert entry["licence"] == "apache-2.0"
        assert entry["files"] == [{"name": "model.safetensors", "size": weights.stat().st_size,
                                   "sha256": _sha(weights)}]


def test_mixed_licences(licensed, tmp_path):
    base, llama, unknown = (resolve_model(str(licensed[k])) for k in ("base", "llama", "unknown"))
    recipe_yaml = "merge_method: linear\nmodels:\n  - model: x\n"
    prov = build_provenance(recipe=yaml.safe_load(recipe_yaml), recipe_yaml=recipe_yaml,
                            method="linear", method_title="Linear", method_reference=None,
                            base_model=None, models=[base, llama, unknown])
    write_model_card(tmp_path / "out", prov)
    readme = (tmp_path / "out" / "README.md").read_text()
    front = _front_matter(readme)
    assert front["license"] == "other"
    assert front["license_name"]
    assert front["base_model"] == [base.ref, llama.ref, unknown.ref]
    assert f"- {escape_markdown(base.ref)}: apache-2.0" in readme
    assert f"- {escape_markdown(llama.ref)}: llama3" in readme
    assert f"- {escape_markdown(unknown.ref)}: unknown" in readme
    assert "[paper]" not in readme
    assert [s["role"] for s in prov["sources"]] == ["model"] * 3


def test_shared_other_licence_keeps_its_name_and_link(licensed, tiny_zoo, tmp_path):
    twin = _with_card(tiny_zoo["ft_a"], tmp_path / "twin",
                      (licensed["llama"] / "README.md").read_text())
    sources = [resolve_model(str(p)) for p in (licensed["llama"], twin)]
    prov = _provenance(None, sources, "merge_method: ties\n")
    front = _front_matter(write_and_read(tmp_path / "out", prov))
    assert front["license"] == "other"
    assert front["license_name"] == "llama3"
    assert front["license_link"] == "https://llama.meta.com/llama3/license"


def write_and_read(out: Path, prov) -> str:
    write_model_card(out, prov)
    return (out / "README.md").read_text()


def test_hub_sources_use_repo_id_revision_and_blob_hash(tiny_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    base_dir = _with_card(tiny_zoo["base"], tmp_path / "b", _card("apache-2.0"))
    fake = "0" * 63 + "1"
    fake_hub_snapshot(cache, "org/base", base_dir, blob_names={"model.safetensors": fake})
    base = resolve_model("org/base@main", cache_dir=cache)
    model = resolve_model(str(tiny_zoo["ft_a"]))
    prov = _provenance(base, [base, model], "merge_method: ties\n")  # base listed twice
    assert [s["ref"] for s in prov["sources"]] == ["org/base@main", model.ref]
    hub = prov["sources"][0]
    assert hub["repo_id"] == "org/base" and hub["revision"] == COMMIT
    assert hub["files"][0]["sha256"] == fake  # the blob name, not a rehash
    readme = write_and_read(tmp_path / "out", prov)
    assert _front_matter(readme)["base_model"] == ["org/base", model.ref]
    assert f"| base | org/base@main | {COMMIT} | apache-2.0 | model.safetensors | `{fake}` |" \
        in readme


def test_sharded_sources_list_every_file(tiny_zoo, tmp_path):
    from search.demo.tiny import make_llama

    sharded = make_llama(tmp_path / "sharded", seed=3, like=tiny_zoo["base"],
                         max_shard_size="40KB")
    src = resolve_model(str(sharded))
    prov = _provenance(None, [src], "merge_method: ties\n", hash_workers=4)
    files = prov["sources"][0]["files"]
    assert len(files) == len(src.weight_files) > 1
    assert files == [{"name": f.name, "size": f.stat().st_size, "sha256": _sha(f)}
                     for f in src.weight_files]


def test_recipe_with_backticks_keeps_its_fence(licensed, tmp_path):
    src = resolve_model(str(licensed["base"]))
    recipe_yaml = "merge_method: linear\n# a comment with ``` inside\nmodels: []\n"
    readme = write_and_read(tmp_path / "out", _provenance(None, [src], recipe_yaml))
    assert "````yaml\n" + recipe_yaml + "````\n" in readme


HOSTILE_LICENCE = "mit\n# Injected heading\n<script>alert(1)</script>\n| x | y |"


def _hostile(tmp_path: Path, tiny_zoo, name: str, licence: str) -> Path:
    return _with_card(tiny_zoo["ft_a"], tmp_path / name, _card(licence))


def _body(readme: str) -> str:
    return readme.split("---\n", 2)[2]


def test_hostile_licences_and_references_stay_text(tiny_zoo, tmp_path):
    """A licence string with newlines, HTML and pipes, and a model reference with ``|`` and
    Markdown: no heading, tag, link or table cell of their own in the card."""
    odd = _hostile(tmp_path, tiny_zoo, "a|b_[x](http://evil)", HOSTILE_LICENCE)
    plain = _hostile(tmp_path, tiny_zoo, "plain", "apache-2.0")
    sources = [resolve_model(str(odd)), resolve_model(str(plain))]
    prov = _provenance(None, sources, "merge_method: ties\n")
    readme = write_and_read(tmp_path / "out", prov)
    body = _body(readme)
    headings = [line for line in body.splitlines() if line.startswith("#")]
    assert all(h.startswith(("# ties", "# TIES", "## ")) for h in headings), headings
    assert "Injected heading" in body and "# Injected" not in body.replace("\\# Injected", "")
    assert "<script>" not in body and "&lt;script&gt;" in body
    assert "](http://evil)" not in body
    rows = [line for line in body.splitlines() if line.startswith("| model |")]
    assert len(rows) == 2
    for row in rows:                       # six cells each: no | of a value split a cell
        assert len(re.split(r"(?<!\\)\|", row)) == 8, row
    # the front matter is YAML that reads back as the sources' own values
    front = _front_matter(readme)
    assert front["license"] == "other"
    assert front["base_model"] == [sources[0].ref, sources[1].ref]


def test_hostile_values_in_the_front_matter_read_back(tiny_zoo, tmp_path):
    """A shared licence is copied into the front matter: written by the YAML dumper, it reads
    back exactly and cannot end the front matter early."""
    twins = [_hostile(tmp_path, tiny_zoo, f"t{i}", "x\n---\ntitle: injected") for i in range(2)]
    sources = [resolve_model(str(p)) for p in twins]
    readme = write_and_read(tmp_path / "out", _provenance(None, sources, "merge_method: ties\n"))
    front = _front_matter(readme)
    assert front["license"] == "x\n---\ntitle: injected" and "title" not in front
    assert [line for line in readme.splitlines() if line == "---"] == ["---", "---"]
    assert "All sources declare the licence x --- title: injected," in readme.replace("\\", "")


@pytest.mark.parametrize("text, shown", [
    ("mit\n# heading", "mit \\# heading"),
    ("<b>bold</b> & co", "&lt;b&gt;bold&lt;/b&gt; &amp; co"),
    ("a|b", "a\\|b"),
    ("- item", "\\- item"),
    ("1. item", "1\\. item"),
    ("apache-2.0", "apache-2.0"),
])
def test_escape_markdown(text, shown):
    assert escape_markdown(text) == shown
