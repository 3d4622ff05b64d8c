"""What a merged model is made of: a provenance manifest and a Hugging Face model card.

Every output says plainly that it is a merge, of which models (with revision, licence and the
sha256 of every weight file), by which method (with its paper) and with which recipe.
"""

from __future__ import annotations

import hashlib
import html
import importlib.metadata
import json
import mmap
import os
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from merge_core.sources import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ModelSource, hub_repo_id

SCHEMA = "brmerge-provenance/1"
PROVENANCE_FILE = "brmerge_provenance.json"
CARD_FILE = "README.md"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LICENCE_KEYS = ("license", "license_name", "license_link")
# The card's licence when sources disagree: HF requires license_name with `license: other`.
_MIXED_LICENCE = "mixed-source-licences"


def sha256_file(path: Path, *, chunk: int = 32 << 20) -> str:
    """sha256 of a file, hashed straight from its memory map: no copy out of the page cache
    (reading it in chunks spent much of the time copying; see docs/methods.md). Chunks of ``chunk`` bytes:
    hashlib releases the GIL for each, so other threads run meanwhile."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return digest.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                for start in range(0, size, chunk):
                    digest.update(view[start:start + chunk])
                    if hasattr(mmap, "MADV_DONTNEED"):
                        # unmap what was hashed (the page cache keeps it): the process's
                        # resident memory stays at one chunk, not the whole file
                        mapped.madvise(mmap.MADV_DONTNEED, start, min(chunk, size - start))
            finally:
                view.release()
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a weight file; free for LFS files of a Hugging Face cache snapshot.

    The cache stores an LFS file as ``blobs/<sha256>`` with the snapshot entry a symlink to it,
    so the name is the content hash the Hub verified on download: rehashing gigabytes would only
    repeat that. Anything else (plain folders, git-sha1 blobs of small files) is hashed, or
    its digest taken from ``hash_in_background`` when that hashed the same file (same size
    and modification time) for this process.
    """
    path = Path(path)
    blob = _cache_blob_digest(path)
    if blob is not None:
        return blob
    key = _file_key(path)
    with _early_lock:
        early = _early.pop(key, None) if key is not None else None
    if early is not None:
        try:
            return early.result()
        except OSError:
            pass                    # hash it here, where a lasting error is reported
    return sha256_file(path)


def _cache_blob_digest(path: Path) -> str | None:
    if path.is_symlink():
        target = path.resolve()
        repo_folder = target.parent.parent
        if (target.parent.name == "blobs" and _SHA256.match(target.name)
                and repo_folder in path.parent.resolve().parents):
            return target.name
    return None


# Digests started early, e.g. while the command line imports torch: (path, size, mtime) ->
# future. Each is taken once, by the first file_sha256 of that file.
_early: dict[tuple[str, int, int], Future] = {}
_early_lock = threading.Lock()


def _file_key(path: Path) -> tuple[str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return str(path.absolute()), st.st_size, st.st_mtime_ns


def hash_in_background(paths: Sequence[Path]) -> None:
    """Start hashing ``paths`` on one background thread; ``file_sha256`` then waits for
    these digests instead of reading the files again. A file changed since (size or
    modification time) is hashed anew."""
    jobs = []
    with _early_lock:
        for path in map(Path, paths):
            key = _file_key(path)
            if key is not None and key not in _early and _cache_blob_digest(path) is None:
                _early[key] = Future()
                jobs.append((path, _early[key]))
    if jobs:
        threading.Thread(target=_hash_jobs, args=(jobs,), name="brmerge-hash-early", daemon=True).start()


def _hash_jobs(jobs: list[tuple[Path, Future]]) -> None:
    for path, future in jobs:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(sha256_file(path))
            except OSError as exc:
                future.set_exception(exc)


def source_licence(source: ModelSource) -> str | None:
    """The licence in the source's README.md front matter (``license_name`` for ``other``)."""
    meta = _licence_meta(source)
    if meta.get("license") == "other" and meta.get("license_name"):
        return meta["license_name"]
    return meta.get("license")


def _adapter_files(src: ModelSource) -> tuple[Path, ...]:
    if src.adapter is None:
        return ()
    return tuple(src.adapter / name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))


def build_provenance(*, recipe: Mapping[str, Any], recipe_yaml: str, method: str,
                     method_title: str, method_reference: str | None,
                     base_model: ModelSource | None, models: Sequence[ModelSource],
                     outputs: Mapping[str, str] | None = None,
                     extra: Mapping[str, Any] | None = None,
                     hash_workers: int = 2) -> dict[str, Any]:
    """The provenance manifest: tool, time, method, recipe and every source file's sha256."""
    roles: list[tuple[str, ModelSource]] = []
    seen: set[tuple[Path, str | None, Path | None]] = set()
    # A recipe may list its base among the models too (ties, linear): describe each source once.
    candidates = [("base", base_model)] if base_model is not None else []
    for role, src in candidates + [("model", m) for m in models]:
        key = (src.path, src.revision, src.adapter)   # base+adapter is another source than base
        if key not in seen:
            seen.add(key)
            roles.append((role, src))

    files = sorted({f for _, src in roles for f in (*src.weight_files, *_adapter_files(src))})
    with ThreadPoolExecutor(max_workers=max(1, hash_workers)) as pool:
        # hashlib releases the GIL on large updates, so threads hash files in parallel.
        digests = dict(zip(files, pool.map(file_sha256, files)))

    sources = []
    for role, src in roles:
        meta = _licence_meta(src)
        sources.append({
            "role": role,
            "ref": src.ref,
            "repo_id": hub_repo_id(src.path),
            "revision": src.revision,
            "format": src.format,
            "licence": source_licence(src),
            "licence_metadata": meta,
            "files": [{"name": f.relative_to(src.path).as_posix(), "size": f.stat().st_size,
                       "sha256": digests[f]} for f in src.weight_files],
        })
        if src.adapter is not None:  # a LoRA applied on read: its files are part of the source
            sources[-1]["adapter"] = {
                "path": str(src.adapter), "repo_id": hub_repo_id(src.adapter),
                "files": [{"name": f.name, "size": f.stat().st_size, "sha256": digests[f]}
                          for f in _adapter_files(src)]}

    provenance: dict[str, Any] = {
        "schema": SCHEMA,
        "brmerge_version": _version(),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "method": {"name": method, "title": method_title, "reference": method_reference},
        # JSON-clean copy: the manifest must round-trip, whatever types the recipe model used.
        "recipe": json.loads(json.dumps(dict(recipe), default=str)),
        "recipe_yaml": recipe_yaml,
        "sources": sources,
    }
    if outputs is not None:
        provenance["outputs"] = dict(outputs)
    if extra is not None:
        provenance["extra"] = json.loads(json.dumps(dict(extra), default=str))
    return provenance


def write_model_card(out_dir: Path, provenance: Mapping[str, Any], *, title: str | None = None,
                     extra_sections: Sequence[tuple[str, str]] = ()) -> None:
    """Write README.md (a Hugging Face model card) and brmerge_provenance.json into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(out_dir / PROVENANCE_FILE,
                  json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")
    _write_atomic(out_dir / CARD_FILE,
                  render_model_card(provenance, title=title, extra_sections=extra_sections))


def render_model_card(provenance: Mapping[str, Any], *, title: str | None = None,
                      extra_sections: Sequence[tuple[str, str]] = ()) -> str:
    sources: list[Mapping[str, Any]] = provenance["sources"]
    method: Mapping[str, Any] = provenance["method"]
    refs = list(dict.fromkeys(s.get("repo_id") or s["ref"] for s in sources))

    front: dict[str, Any] = {"base_model": refs, "tags": ["merge", "brmerge"],
                             "library_name": "transformers"}
    metas = [s.get("licence_metadata") or {} for s in sources]
    shared = all(metas) and all(m == metas[0] for m in metas)
    if shared:
        front.update(metas[0])
    else:
        front.update({"license": "other", "license_name": _MIXED_LICENCE})

    # Everything below that comes from a source's files, the recipe or the caller is escaped
    # (escape_markdown): a licence or model reference must not add headings, HTML or table
    # cells. The front matter is written by the YAML dumper, which quotes what needs it.
    method_name = escape_markdown(method.get("title") or method["name"])
    paper = f" ([paper]({_url(method['reference'])}))" if method.get("reference") else ""
    heading = escape_markdown(title) if title else f"{method_name} merge of {len(sources)} models"
    lines = [
        "---", _front_matter_yaml(front), "---", "",
        f"# {heading}", "",
        "This model is a **merge** of existing pretrained models, made with brmerge "
        f"{escape_markdown(provenance.get('brmerge_version', ''))}. It was not trained from "
        "scratch and was not fine-tuned: its weights are computed from the weights of the "
        "models listed below, which keep their own licences, limitations and biases.", "",
        "## Merge method", "",
        f"**{method_name}** ({_code(method['name'])}){paper}.", "",
        "## Sources", "",
        "| role | model | revision | licence | weight file | sha256 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in sources:
        for f in s["files"]:
            cells = [s["role"], s["ref"], s.get("revision") or "local folder",
                     s.get("licence") or "unknown", f["name"]]
            lines.append("| " + " | ".join(escape_markdown(c) for c in cells) + f" | {_sha(f['sha256'])} |")
    lines += ["", "## Licences", ""]
    if shared:
        lines.append(f"All sources declare the licence {escape_markdown(sources[0].get('licence'))}, "
                     "so this merge carries it too.")
    else:
        lines.append("The sources do not share one declared licence, so the card says "
                     f"`license: other` (`{_MIXED_LICENCE}`). Each source's terms apply to what "
                     "this merge takes from it; check them all before use:")
        lines.append("")
        for s in sources:
            licence = s.get("licence") or "unknown (no licence in its model card: check its terms)"
            lines.append(f"- {escape_markdown(s['ref'])}: {escape_markdown(licence)}")
    recipe_yaml = str(provenance.get("recipe_yaml", "")).rstrip("\n")
    fence = "`" * max(3, _longest_backtick_run(recipe_yaml) + 1)
    lines += ["", "## Recipe", "",
              "The mergekit-compatible recipe, as given to brmerge:", "",
              f"{fence}yaml", recipe_yaml, fence, ""]
    if provenance.get("outputs"):
        lines += ["## Output files", "", "| file | sha256 |", "| --- | --- |"]
        lines += [f"| {escape_markdown(name)} | {_sha(sha)} |" for name, sha in provenance["outputs"].items()]
        lines.append("")
    lines += ["## Provenance", "",
              f"Created {escape_markdown(provenance.get('created', ''))} by brmerge "
              f"{escape_markdown(provenance.get('brmerge_version', ''))}. The same facts, machine-readable, are in "
              f"`{PROVENANCE_FILE}` (schema {_code(provenance.get('schema', SCHEMA))}).", ""]
    for section_title, body in extra_sections:
        # the body is the caller's Markdown: it escapes the values it puts in (escape_markdown)
        lines += [f"## {escape_markdown(section_title)}", "", body.rstrip("\n"), ""]
    return "\n".join(lines)


class _FrontMatterDumper(yaml.SafeDumper):
    """Strings with line breaks or other control characters are written double-quoted on one
    line (``"a\\nb"``): no line of the front matter can then read as its end (``---``)."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    one_line = value.isprintable()
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=None if one_line else '"')


_FrontMatterDumper.add_representer(str, _represent_str)


def _front_matter_yaml(front: Mapping[str, Any]) -> str:
    return yaml.dump(dict(front), Dumper=_FrontMatterDumper, sort_keys=False, allow_unicode=True,
                     width=float("inf")).rstrip()


def _licence_meta(source: ModelSource) -> dict[str, str]:
    front = _front_matter(source.path / "README.md")
    meta = {k: front[k] for k in _LICENCE_KEYS if front.get(k) not in (None, "", [])}
    if isinstance(meta.get("license"), list):  # a few cards list several; keep them readable
        meta["license"] = ", ".join(str(x) for x in meta["license"])
    return {k: str(v) for k, v in meta.items()}


def _front_matter(readme: Path) -> dict[str, Any]:
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}  # no model card: the licence is unknown, which the card then says
    match = re.match(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, flags=re.DOTALL)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}  # a broken card is the source's problem; we report the licence as unknown
    return data if isinstance(data, dict) else {}


def _version() -> str:
    try:
        return importlib.metadata.version("brmerge")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"  # running from a source tree that was never installed


# Markdown punctuation that can start emphasis, links, images, code, HTML or table cells anywhere
# in a line; "<" and "&" are HTML-escaped first.
_MD_INLINE = re.compile(r"([\\`*_\[\]#|!~])")
# ... and what starts a block (list, quote, setext heading, ordered list) at a line's start
_MD_ORDERED = re.compile(r"^(\d+)([.)])")


def escape_markdown(value: Any) -> str:
    """``value`` as one line of literal text in Markdown and HTML: newlines become spaces (no
    value can start a heading or end a table row), HTML special characters become entities
    (no ``<script>``) and Markdown punctuation is backslash-escaped (no links, emphasis,
    code or table cells). For every value that comes from a source, the recipe or a user."""
    text = " ".join(str(value).split())
    text = html.escape(text, quote=False)
    text = _MD_INLINE.sub(r"\\\1", text)
    text = _MD_ORDERED.sub(r"\1\\\2", text)
    return re.sub(r"^([-+=])", r"\\\1", text)


def _sha(value: Any) -> str:
    text = str(value)
    return f"`{text}`" if _SHA256.match(text) else escape_markdown(text)


def _code(value: Any) -> str:
    # a name in a code span when it is a plain identifier, else escaped text
    text = str(value)
    return f"`{text}`" if re.fullmatch(r"[\w./-]+", text) else escape_markdown(text)


def _url(value: Any) -> str:
    # a link destination: whitespace, angle brackets, parentheses and quotes percent-encoded
    return re.sub(r"[\s<>()\"'`|]", lambda m: f"%{ord(m.group()):02X}", str(value))


def _longest_backtick_run(text: str) -> int:
    return max((len(m) for m in re.findall(r"`+", text)), default=0)


def _write_atomic(path: Path, text: str) -> None:
    # A crash mid-write must not leave a truncated card beside a finished model.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
