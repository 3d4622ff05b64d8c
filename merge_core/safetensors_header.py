"""A safetensors file's header, read and validated before any tensor byte is read.

The rules are the safetensors library's own (``SafeTensors::read_metadata`` and
``Metadata::validate`` in its ``tensor.rs``): an 8-byte little-endian header length of at
most 100 MB that fits in the file; a UTF-8 JSON object; an optional ``__metadata__`` mapping
strings to strings; for every other key a known ``dtype``, a ``shape`` of non-negative
integers and two ``data_offsets``; sorted by offsets, the tensors start at 0 and follow one
another with no gap or overlap, each spans exactly ``numel × itemsize`` bytes, and the last
one ends where the file ends. A file that breaks one is refused with one line naming the
file and the tensor, so a merge never reads bytes that belong to another tensor, or past
the end of a truncated file (``torch.empty`` would leave them as heap garbage).

The cost is one pass over the header entries per file, never per tensor read.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from merge_core.sources import SourceError

# safetensors refuses headers above 100 MB (MAX_HEADER_SIZE in tensor.rs).
MAX_HEADER_BYTES = 100_000_000
# An offset or a dimension is a Rust ``usize`` there (64-bit platforms).
_USIZE_MAX = 2**64 - 1

# Bits per element of each dtype the safetensors format (0.8) names; brmerge reads only
# those of merge_core.dtypes.TABLE (``merge_core.io`` says so for the others), but the
# header check knows them all so that it refuses exactly what safetensors refuses.
ITEMBITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "F64": 64, "I64": 64, "U64": 64, "C64": 64,
}

_FIX = "re-download or re-save it"


class HeaderError(SourceError):
    """A safetensors file is malformed; the message names the file, the tensor and the fix."""


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """``(header length, header)`` of the safetensors file ``path``, validated against the
    file's size (see the module doc). ``header`` keeps ``__metadata__`` when present."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise HeaderError(f"{path} is not a safetensors file (shorter than 8 bytes): {_FIX}")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES:
                raise HeaderError(f"{path} declares a {n}-byte header (more than safetensors' "
                                  f"{MAX_HEADER_BYTES}), so it is corrupt: {_FIX}")
            if 8 + n > size:
                raise HeaderError(f"{path} declares a {n}-byte header but the file has {size} bytes, "
                                  f"so it is truncated: {_FIX}")
            raw = f.read(n)
    except OSError as e:
        raise HeaderError(f"cannot read weight file {path}: {e.strerror or e}") from e
    header = _parse(path, raw)
    validate(path, header, body_bytes=size - 8 - n)
    return n, header


def _parse(path: Path, raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HeaderError(f"{path} has a safetensors header that is not UTF-8: {_FIX}") from None

    def no_constants(name: str) -> None:   # NaN/Infinity are not JSON (serde refuses them)
        raise ValueError(f"{name} is not JSON")

    try:
        header = json.loads(text, parse_constant=no_constants, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"{path} has an unreadable safetensors header ({e}): {_FIX}") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path} has a safetensors header that is not a JSON object: {_FIX}")
    return header


class _Repeated(dict):
    """A JSON object with a repeated key (the last value kept, as json and serde's maps do);
    ``validate`` refuses it as a tensor entry, where serde's struct refuses a repeated field."""

    repeated: str = ""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = dict(pairs)
    if len(out) < len(pairs):
        seen: set[str] = set()
        first = next(k for k, _ in pairs if k in seen or seen.add(k))
        out = _Repeated(out)
        out.repeated = first
    return out


def _uint(value: object) -> bool:
    return type(value) is int and 0 <= value <= _USIZE_MAX   # bool is an int subclass: refused


def validate(path: Path, header: dict[str, Any], *, body_bytes: int) -> None:
    """Refuse ``header`` (of a file whose data section has ``body_bytes`` bytes) unless it
    obeys safetensors' rules; the message names the first offending tensor."""
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict)
                                 and all(isinstance(v, str) for v in meta.values())):
        raise HeaderError(f"{path}: the header's __metadata__ must map strings to strings: {_FIX}")
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise HeaderError(f"{where} lacks dtype, shape or data_offsets in the header: {_FIX}")
        if isinstance(info, _Repeated):
            raise HeaderError(f"{where} repeats the field {info.repeated!r} in the header: {_FIX}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEMBITS:
            raise HeaderError(f"{where} has unknown dtype {dtype!r} (safetensors knows "
                              f"{', '.join(ITEMBITS)}): {_FIX}")
        if not isinstance(shape, list) or not all(_uint(d) for d in shape):
            raise HeaderError(f"{where} has shape {shape!r}, not a list of non-negative integers: {_FIX}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_uint(o) for o in offsets)):
            raise HeaderError(f"{where} has data_offsets {offsets!r}, not two non-negative integers: {_FIX}")
        numel = 1
        for d in shape:
            numel *= d
        start, end = offsets
        bits = numel * ITEMBITS[dtype]
        if bits > _USIZE_MAX:
            raise HeaderError(f"{where} has shape {shape} too large to address: {_FIX}")
        if bits % 8 or end - start != bits // 8:
            raise HeaderError(f"{where} has data_offsets {offsets} ({end - start} bytes) but its shape "
                              f"{shape} of {dtype} needs {bits / 8:g} bytes: {_FIX}")
        spans.append((start, end, name))
    spans.sort()
    at = 0
    for start, end, name in spans:
        if start != at:
            kind = "a gap before it" if start > at else "an overlap with the tensor before it"
            raise HeaderError(f"{path}: tensor {name!r} starts at byte {start} of the data, leaving {kind} "
                              f"(the previous tensor ends at {at}): {_FIX}")
        at = end
    if at != body_bytes:
        last = repr(spans[-1][2]) if spans else "(none)"
        raise HeaderError(f"{path}: the tensors end at byte {at} of the data but the file holds {body_bytes} "
                          f"bytes of data (last tensor {last}), so it is truncated or has extra bytes: {_FIX}")
