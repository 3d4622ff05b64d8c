"""What a campaign's models are: each source's resolved folder and the SHA-256 of its weight files.

A study's scores are only comparable while its models stay the same. A resumed campaign whose
fine-tune was retrained in place, or whose relative path resolves elsewhere because the resume
runs from another directory, would score other models under the same recipes, and the genome
cache would hand out the old scores. The driver records these identities in the study
(``search.trials.record_sources``) and ``--resume`` compares them (``changes``).

Hashing reads every weight byte once (about 1-2 s per GB); the digests are cached in
``DIR/.brmerge-hashes.json`` by resolved path, size and modification time, so a resume hashes
only files that changed. The cache is a speed-up only: a lost or edited cache costs a re-hash,
never a wrong answer about a file whose size or time changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from merge_core.sources import ModelSource
from search.campaign_files import replace_text

HASH_CACHE = ".brmerge-hashes.json"
CHUNK = 8 << 20   # 8 MiB reads: large enough that hashing, not syscalls, sets the pace


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class HashCache:
    """``{resolved path|size|mtime_ns: sha256}`` in the campaign directory."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.path = self.directory / HASH_CACHE
        try:
            data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
        except (OSError, ValueError):
            data = {}   # unreadable: re-hash (the cache is never trusted for more than speed)
        self.entries: dict[str, str] = {k: v for k, v in data.items() if isinstance(v, str)} \
            if isinstance(data, dict) else {}
        self.dirty = False

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        key = _file_key(path)
        if key not in self.entries:
            self.entries[key] = _sha256(path)
            self.dirty = True
        return self.entries[key]

    def save(self) -> None:
        if self.dirty and self.directory.is_dir():
            replace_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True), root=self.directory)
            self.dirty = False


def weight_files(source: ModelSource) -> list[Path]:
    """The files whose bytes a merge reads: the weights, and a LoRA adapter's weights."""
    files = list(source.weight_files)
    if source.adapter is not None:
        files += sorted(Path(source.adapter).glob("*.safetensors")) + sorted(Path(source.adapter).glob("*.bin"))
    return files


def identity(source: ModelSource, cache: HashCache) -> dict[str, Any]:
    """``{"ref", "path", "adapter", "files": {name: sha256}}`` of one resolved model."""
    root = Path(source.path)
    files: dict[str, str] = {}
    for f in weight_files(source):
        f = Path(f)
        name = str(f.relative_to(root)) if f.is_relative_to(root) else str(f.resolve())
        files[name] = cache.digest(f)
    return {"ref": source.ref, "path": str(Path(source.path).resolve()),
            "adapter": str(Path(source.adapter).resolve()) if source.adapter is not None else None,
            "files": files}


def identities(sources: Sequence[ModelSource], directory: Path) -> list[dict[str, Any]]:
    """The identity of every source (base first), hashing only what the cache does not know."""
    directory = Path(directory)
    cache = HashCache(directory)
    out = [identity(s, cache) for s in sources]
    if os.access(directory, os.W_OK):
        cache.save()
    return out


def changes(before: Sequence[Mapping[str, Any]], now: Sequence[Mapping[str, Any]]) -> list[str]:
    """One phrase per model that is not what it was (empty when all are the same)."""
    out: list[str] = []
    old = {m.get("ref"): m for m in before}
    for m in now:
        ref = m["ref"]
        b = old.get(ref)
        if b is None:
            out.append(f"model '{ref}' was not in the campaign when it began")
            continue
        if b.get("path") != m["path"]:
            out.append(f"model '{ref}' resolves to {m['path']} now, to {b.get('path')} when the campaign began "
                       "(a relative path resumed from another directory?)")
        elif b.get("adapter") != m.get("adapter"):
            out.append(f"model '{ref}': its adapter is {m.get('adapter')} now, {b.get('adapter')} before")
        elif dict(b.get("files") or {}) != dict(m["files"]):
            differ = sorted(set(b.get("files") or {}) ^ set(m["files"])
                            | {k for k in m["files"] if (b.get("files") or {}).get(k) not in (None, m["files"][k])})
            out.append(f"model '{ref}': its weights changed since the campaign began ({', '.join(differ[:3])}"
                       + (", ..." if len(differ) > 3 else "") + ")")
    return out
