"""Safetensors reading and writing, one tensor at a time.

Reading maps each file once and copies a single tensor out of the mapping; the pages
it touched are then released (``madvise(DONTNEED)``) so that the resident set stays at
about one tensor per input, not the whole model. Writing knows every output shape and
dtype in advance (from the plan), so each shard's header is written first and tensors
stream into place; the output folder appears under its final name only when complete.

An existing output folder is replaced (``--overwrite``) only when it is an earlier brmerge
output, recognised by its provenance file, and never when it is or contains a source
model, a protected folder (a campaign), the working directory or one of its parents:
see ``check_output``. The replacement is a swap (``replace_output``).
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import secrets
import shutil
import struct
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_core.dtypes import from_safetensors, to_safetensors
from merge_core.errors import MergeError
from merge_core.staging import remove_stale_staging, staging_folder
from merge_core.safetensors_header import read_header as read_safetensors_header

# Tensors are viewed read-only out of the mapping and copied at once; torch's warning
# about non-writable buffers does not apply.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

_PAGE = mmap.PAGESIZE
OUTPUT_MARK = "brmerge_provenance.json"   # every brmerge output has it (== provenance.PROVENANCE_FILE)
_OUTPUT_SCHEMA = "brmerge-provenance/"


@dataclass(frozen=True)
class TensorEntry:
    shape: tuple[int, ...]
    dtype: str            # safetensors spelling ("BF16", ...)
    start: int            # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Tensor entries (absolute offsets) and ``__metadata__`` of a safetensors file, after
    the header was validated against the file (offsets contiguous, sizes = numel x itemsize,
    end = file size: ``merge_core.safetensors_header``), so no read leaves the tensor."""
    n, header = read_safetensors_header(Path(path))
    base = 8 + n
    meta = header.pop("__metadata__", None) or {}
    entries = {}
    for name, h in header.items():
        if not supported_dtype(h["dtype"]):
            raise MergeError(f"{path}: tensor {name!r} has dtype {h['dtype']}, which brmerge cannot read "
                             "(this torch lacks it): convert the model to a float dtype first")
        entries[name] = TensorEntry(tuple(h["shape"]), h["dtype"], base + h["data_offsets"][0],
                                    base + h["data_offsets"][1])
    return entries, meta


def supported_dtype(code: str) -> bool:
    try:
        from_safetensors(code)
    except KeyError:
        return False
    return True


class SafetensorsFile:
    """One memory-mapped safetensors file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries, self.metadata = read_header(self.path)
        self._file = open(self.path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def get(self, name: str, *, device: torch.device | str = "cpu",
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh tensor (a copy, owned by the caller) on ``device``."""
        e = self.entries[name]
        st_dtype = from_safetensors(e.dtype)
        count = e.nbytes // torch.empty((), dtype=st_dtype).element_size()
        if count == 0:
            return torch.empty(e.shape, dtype=dtype or st_dtype, device=device)
        target = dtype or st_dtype
        if torch.device(device).type == "cpu" and hasattr(os, "preadv"):
            # pread copies from the page cache in one call: no page faults on the mapping
            # (faster than copying out of the mmap; see docs/methods.md), nothing to madvise away
            out = torch.empty(e.shape, dtype=st_dtype)
            self._pread_into(out, e, name)
            return out if target == st_dtype else out.to(target)
        view = torch.frombuffer(self._map, dtype=st_dtype, count=count, offset=e.start).reshape(e.shape)
        if torch.device(device).type == "cpu":
            out = torch.empty(e.shape, dtype=target)
            out.copy_(view)
        else:
            out = view.to(device=device, non_blocking=False).to(target)
        self.release(e)
        return out

    def _pread_into(self, out: torch.Tensor, e: TensorEntry, name: str) -> None:
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())   # (nbytes,) bytes of ``out``
        done = 0
        while done < e.nbytes:                  # Linux returns at most ~2 GiB per call
            got = os.preadv(self._file.fileno(), [buf[done:]], e.start + done)
            if got <= 0:
                raise MergeError(f"{self.path}: file ends inside tensor {name!r}")
            done += got

    def release(self, e: TensorEntry) -> None:
        # Drop the mapped pages from this process's resident set (the page cache keeps them).
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = (e.start // _PAGE) * _PAGE
        length = e.end - start
        if length > 0:
            self._map.madvise(mmap.MADV_DONTNEED, start, length)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        self._file.close()


class TensorReader:
    """All tensors of one model, read on demand across its shards."""

    def __init__(self, files: Sequence[str | Path], *, pickle_ok: bool = False):
        self._files: dict[Path, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        for path in files:
            p = Path(path)
            if p.suffix == ".safetensors":
                f = SafetensorsFile(p)
                self._files[p] = f
                for name in f.entries:
                    self._where[name] = f
            elif pickle_ok:
                # opted in with --allow-pickle: memory-mapped, and weights_only refuses code objects
                state = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
                self._pickled.update(state)
            else:
                raise MergeError(f"{p}: pickle checkpoints are refused: convert it to safetensors (only "
                                 "`brmerge merge` reads pickle, with --allow-pickle, if you trust it)")

    def names(self) -> list[str]:
        return list(self._where) + [n for n in self._pickled if n not in self._where]

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._pickled

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._where:
            return self._where[name].entries[name].shape
        return tuple(self._pickled[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        if name in self._where:
            return from_safetensors(self._where[name].entries[name].dtype)
        return self._pickled[name].dtype

    def get(self, name: str, *, device: torch.device | str = "cpu",
            dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self._where:
            return self._where[name].get(name, device=device, dtype=dtype)
        if name in self._pickled:
            t = self._pickled[name]
            return t.to(device=device, dtype=dtype or t.dtype, copy=True)
        raise KeyError(name)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._where.clear()
        self._pickled.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB', or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            number = s[: -len(unit)]
            break
    else:
        number, factor = s, 1
    try:
        value = float(number)
    except ValueError:
        raise MergeError(f"shard size {text!r} is not a size: write e.g. 5GB, 500MB or 2GiB") from None
    if value <= 0:
        raise MergeError(f"shard size {text!r} must be positive")
    return int(value * factor)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def shard_layout(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Greedy shards in the given order; a tensor larger than the limit gets its own."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [s for s in shards if s]


class ShardedWriter:
    """Streams tensors into sharded safetensors under a temporary folder.

    ``write`` must receive the tensors in the order given; ``commit`` adds the other
    files and renames the folder into place. Anything else leaves no output behind.
    """

    def __init__(self, out_dir: str | Path, tensors: Sequence[OutputTensor], *,
                 max_shard_bytes: int, overwrite: bool = False,
                 metadata: Mapping[str, str] | None = None, protected: Iterable[str | Path] = ()):
        """``protected``: folders ``--overwrite`` must never replace (the sources, a campaign)."""
        self._protected = tuple(protected)
        self.out_dir = check_output(out_dir, overwrite=overwrite, protected=self._protected)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(self.out_dir)
        self.tmp_dir = staging_folder(self.out_dir, "partial")
        self._overwrite = overwrite
        self._layout = shard_layout(list(tensors), max_shard_bytes)
        self._order = [t for shard in self._layout for t in shard]
        self._next = 0
        self._meta = {"format": "pt", **(metadata or {})}
        self._handle = None
        self._shard_index = -1
        self._remaining_in_shard = 0
        n = len(self._layout)
        self.shard_names = (["model.safetensors"] if n == 1 else
                            [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self.bytes_written = 0

    @property
    def order(self) -> list[OutputTensor]:
        return list(self._order)

    def _open_next_shard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._shard_index += 1
        shard = self._layout[self._shard_index]
        header: dict[str, object] = {"__metadata__": self._meta}
        offset = 0
        for t in shard:
            header[t.name] = {"dtype": to_safetensors(t.dtype), "shape": list(t.shape),
                              "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self._handle = open(self.tmp_dir / self.shard_names[self._shard_index], "wb")
        self._handle.write(struct.pack("<Q", len(blob)) + blob)
        self._remaining_in_shard = len(shard)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            self._write(name, tensor)
        except OSError as e:
            raise self._disk_error(e) from None

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next]
        if name != expected.name:
            raise RuntimeError(f"writer expected tensor {expected.name!r} next, got {name!r}")
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                               f"planned {expected.shape} {expected.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        bad = count_nonfinite(t)
        if bad:
            raise MergeError(f"the merge of tensor {name!r} has {bad} inf/NaN value(s), so no output was written: "
                             "check the recipe's weights (e.g. a weight of 1e300 overflows) and the sources")
        if self._remaining_in_shard == 0:
            self._open_next_shard()
        if t.numel():
            raw = t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8).reshape(-1)
            self._handle.write(memoryview(raw.numpy()))
            self.bytes_written += raw.numel()
        self._remaining_in_shard -= 1
        self._next += 1

    def commit(self, extra_files: Mapping[str, bytes | str | Path] = {}) -> Path:
        """Finish the shards, add ``extra_files`` (name -> content or source path), move into place."""
        try:
            return self._commit(extra_files)
        except OSError as e:
            raise self._disk_error(e) from None

    def _disk_error(self, e: OSError) -> OSError | MergeError:
        """A full disk (or quota) as one line naming the output and the bytes it needs; the
        partial folder is removed first, so nothing that looks complete is left. Any other
        OSError is returned unchanged (re-raised by the caller)."""
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            return e
        self.abort()
        need = sum(t.nbytes for t in self._order)
        try:
            free = f"{shutil.disk_usage(self.out_dir.parent).free:,} bytes are free there"
        except OSError:
            free = "the free space is unknown"
        return MergeError(f"the disk filled while writing {self.out_dir} ({e.strerror}): the output needs "
                          f"{need:,} bytes of tensors plus its tokenizer and config, {free}; nothing was "
                          "kept: free space or choose another --out")

    def _commit(self, extra_files: Mapping[str, bytes | str | Path]) -> Path:
        if self._next != len(self._order):
            raise RuntimeError(f"writer got {self._next} of {len(self._order)} tensors")
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if len(self._layout) > 1:
            weight_map = {t.name: self.shard_names[i] for i, shard in enumerate(self._layout) for t in shard}
            total = sum(t.nbytes for t in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.tmp_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for name, content in extra_files.items():
            dest = self.tmp_dir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, dest)
            elif isinstance(content, bytes):
                dest.write_bytes(content)
            else:
                dest.write_text(content, encoding="utf-8")
        return replace_output(self.tmp_dir, self.out_dir, overwrite=self._overwrite, protected=self._protected)

    def abort(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()   # flushing may fail again on a full disk: the folder goes anyway
            except OSError:
                pass
            self._handle = None
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if self.tmp_dir.exists():  # not committed: an error, or the caller stopped early
            self.abort()


def check_output(out_dir: str | Path, *, overwrite: bool, protected: Iterable[str | Path] = ()) -> Path:
    """The absolute output folder, after checking that an output may be put there: a new
    path, or with ``overwrite`` an earlier brmerge output that is not, and does not contain,
    a ``protected`` folder (the merge's sources, a campaign), the working directory or one of
    its parents. Call it before any work; ``replace_output`` checks again."""
    out = Path(out_dir).absolute()
    if not (out.exists() or out.is_symlink()):
        return out.resolve()
    shown = str(out)
    if not overwrite:
        raise MergeError(f"output folder {shown!r} already exists: choose another --out or pass --overwrite")
    if out.is_symlink() or not out.is_dir():
        raise MergeError(f"--out {shown!r} is not a folder brmerge wrote (a file or a link): --overwrite only "
                         "replaces an earlier brmerge output; choose another --out")
    out = out.resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise MergeError(f"--out {shown!r} is the working directory or one of its parents, which --overwrite "
                         "never replaces: choose a new folder for the output")
    for p in protected:
        guarded = Path(p).expanduser().resolve()
        if guarded == out or out in guarded.parents:
            raise MergeError(f"--out {shown!r} is or contains {str(guarded)!r}, a source model or campaign "
                             "folder, which --overwrite never replaces: choose another --out")
    if not _is_brmerge_output(out):
        raise MergeError(f"--out {shown!r} exists and is not a brmerge output (no valid {OUTPUT_MARK}): "
                         "--overwrite only replaces an earlier brmerge output; choose another --out")
    return out


def replace_output(new_dir: str | Path, out_dir: str | Path, *, overwrite: bool,
                   protected: Iterable[str | Path] = ()) -> Path:
    """Put the finished folder ``new_dir`` (a sibling of ``out_dir``) under the name
    ``out_dir``. An existing ``out_dir`` is replaced only as ``check_output`` allows, by a
    swap: moved aside, the new folder renamed into place, then the old one deleted (if the
    rename fails, the old one is put back)."""
    out = check_output(out_dir, overwrite=overwrite, protected=protected)
    new_dir = Path(new_dir)
    if not out.exists():
        os.rename(new_dir, out)
        return out
    aside = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
    os.rename(out, aside)
    try:
        os.rename(new_dir, out)
    except BaseException:
        os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return out


def _is_brmerge_output(folder: Path) -> bool:
    try:
        mark = json.loads((folder / OUTPUT_MARK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(mark, dict) and str(mark.get("schema", "")).startswith(_OUTPUT_SCHEMA)


def count_nonfinite(t: torch.Tensor) -> int:
    """inf/NaN values in ``t``: one pass of the CPU kernels, else one reduction first and
    the exact count only when it is not finite (an overflowing sum of finite values is a
    false alarm the count then clears)."""
    if not t.is_floating_point():
        return 0
    from merge_core.methods.sparsify import kernels_for

    kernels = kernels_for(t)
    if kernels is not None:
        return kernels.count_nonfinite(t)
    if torch.isfinite(t.sum()):
        return 0
    return int(t.numel() - torch.isfinite(t).sum())


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a model folder, safetensors preferred (used when no
    resolved source is at hand, e.g. reading back an output)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        wm = json.loads(index.read_text())["weight_map"]
        return sorted({folder / f for f in wm.values()})
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(folder.glob("*.safetensors"))


def load_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model folder (tests and small models only)."""
    out = {}
    with TensorReader(weight_files(folder)) as r:
        for name in r.names():
            out[name] = r.get(name)
    return out
