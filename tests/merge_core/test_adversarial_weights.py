"""Weight files that lie: offsets that disagree with the header, truncated files, unknown
dtypes. brmerge must refuse exactly the files the safetensors library refuses, before any
tensor byte is read, with one line naming the file and the tensor."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from merge_core.errors import BrmergeError
from merge_core.io import TensorReader, read_header
from merge_core.safetensors_header import HeaderError
from merge_core.safetensors_header import read_header as read_raw_header

ROOT = Path(__file__).resolve().parents[2]
NORM = "model.norm.weight"


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path: Path, header: dict | None, body: bytes, *, raw_header: bytes | None = None) -> Path:
    blob = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)
    return path


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _norm_last(src: Path, dest: Path) -> tuple[dict, bytes]:
    """``src``'s tensors re-laid so that model.norm.weight is the last one in the file."""
    header, body = _split(src)
    order = [k for k in _by_offset(header) if k != NORM] + [NORM]
    out, data, at = {"__metadata__": header.get("__metadata__", {})}, b"", 0
    for k in order:
        s, e = header[k]["data_offsets"]
        out[k] = {**header[k], "data_offsets": [at, at + e - s]}
        data += body[s:e]
        at += e - s
    _write(dest, out, data)
    return out, data


def _library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
        return True
    except Exception:   # the library's own error types (SafetensorError, ...)
        return False


def _we_accept(path: Path) -> bool:
    try:
        read_raw_header(path)
        return True
    except HeaderError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return False


def _crafted(tiny_zoo, root: Path) -> dict[str, Path]:
    """A set of well-formed and malformed files built from a real model file."""
    header, body = _norm_last(tiny_zoo["base"] / "model.safetensors", root / "valid.safetensors")
    files = {"valid": root / "valid.safetensors"}
    names = _by_offset(header)
    mid = names[len(names) // 2]
    t = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

    def variant(name: str, edit, data: bytes = body) -> None:
        h = json.loads(json.dumps(header))
        edit(h)
        files[name] = _write(root / f"{name}.safetensors", h, data)

    # the attack: model.norm.weight ([64] F32 = 256 bytes) given 16 bytes, file truncated there
    s = header[NORM]["data_offsets"][0]
    variant("norm_short_truncated", lambda h: h[NORM].update(data_offsets=[s, s + 16]), body[:s + 16])
    variant("norm_short_keep_length", lambda h: h[NORM].update(data_offsets=[s, s + 16]))
    # in the middle: the shortened tensor would read its neighbour's bytes
    ms, me = header[mid]["data_offsets"]
    variant("middle_short", lambda h: h[mid].update(data_offsets=[ms, ms + 16]))

    def shift_after_mid(h: dict) -> None:   # offsets consistent with each other, sizes are not
        h[mid]["data_offsets"] = [ms, ms + 16]
        for k in names[names.index(mid) + 1:]:
            a, b = h[k]["data_offsets"]
            h[k]["data_offsets"] = [a - (me - ms - 16), b - (me - ms - 16)]
    variant("middle_short_shifted", shift_after_mid, body[:ms + 16] + body[me:])
    variant("middle_overlap", lambda h: h[mid].update(data_offsets=[ms - 4, me - 4]))
    variant("truncated_file", lambda h: None, body[:-1])
    variant("extra_bytes", lambda h: None, body + b"\0" * 8)
    variant("unknown_dtype", lambda h: h[mid].update(dtype="F33"))
    variant("shape_mismatch", lambda h: h[NORM].update(shape=[65]))
    variant("negative_dim", lambda h: h[NORM].update(shape=[-64]))
    variant("float_dim", lambda h: h[NORM].update(shape=[64.0]))
    variant("metadata_not_strings", lambda h: h.update(__metadata__={"format": 1}))
    variant("metadata_null", lambda h: h.update(__metadata__=None))
    variant("no_offsets", lambda h: h[NORM].pop("data_offsets"))
    variant("reordered_keys", lambda h: h.update(dict(reversed(list(h.items())))))
    files["overflow"] = _write(root / "overflow.safetensors", {"a": {**t, "shape": [2**32, 2**32]}}, b"\0" * 8)
    files["not_at_zero"] = _write(root / "not_at_zero.safetensors", {"a": {**t, "data_offsets": [8, 16]}},
                                  b"\0" * 16)
    files["empty_tensor_middle"] = _write(root / "empty_tensor_middle.safetensors", {
        "a": t, "b": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [8, 8]},
        "c": {**t, "data_offsets": [8, 16]}}, b"\0" * 16)
    files["no_tensors"] = _write(root / "no_tensors.safetensors", {}, b"")
    files["repeated_field"] = _write(root / "repeated_field.safetensors", None, b"\0" * 8, raw_header=(
        b'{"a":{"dtype":"F32","shape":[2],"shape":[2],"data_offsets":[0,8]}}'))
    files["nan_in_json"] = _write(root / "nan_in_json.safetensors", None, b"\0" * 8, raw_header=(
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"__metadata__":{"x":NaN}}'))
    files["not_utf8"] = _write(root / "not_utf8.safetensors", None, b"", raw_header=b'{"\xff":1}')
    files["not_object"] = _write(root / "not_object.safetensors", None, b"", raw_header=b"[]")
    files["bad_json"] = _write(root / "bad_json.safetensors", None, b"", raw_header=b'{"a": ')
    (root / "huge_header.safetensors").write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    files["huge_header"] = root / "huge_header.safetensors"
    (root / "header_past_end.safetensors").write_bytes(struct.pack("<Q", 64) + b"{}")
    files["header_past_end"] = root / "header_past_end.safetensors"
    (root / "tiny.safetensors").write_bytes(b"\x02\0\0")
    files["tiny"] = root / "tiny.safetensors"
    return files


def test_accepts_and_refuses_exactly_what_safetensors_does(tiny_zoo, tmp_path):
    files = _crafted(tiny_zoo, tmp_path)
    decisions = {name: (_library_accepts(p), _we_accept(p)) for name, p in files.items()}
    assert {n: lib for n, (lib, ours) in decisions.items() if lib != ours} == {}
    # the set exercises both answers, and the attacks are among the refused
    accepted = {n for n, (lib, _) in decisions.items() if lib}
    assert {"valid", "reordered_keys", "empty_tensor_middle", "no_tensors", "metadata_null"} <= accepted
    assert not accepted & {"norm_short_truncated", "norm_short_keep_length", "middle_short",
                           "middle_short_shifted", "middle_overlap", "unknown_dtype"}


@pytest.mark.parametrize("case", ["norm_short_truncated", "middle_short", "middle_short_shifted"])
def test_offsets_that_lie_are_refused_before_any_read(tiny_zoo, tmp_path, case):
    path = _crafted(tiny_zoo, tmp_path)[case]
    with pytest.raises(BrmergeError) as err:
        TensorReader([path])
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "tensor '" in msg


def test_unknown_dtype_is_one_line_not_a_key_error(tiny_zoo, tmp_path):
    path = _crafted(tiny_zoo, tmp_path)["unknown_dtype"]
    with pytest.raises(BrmergeError, match="unknown dtype 'F33'"):
        read_header(path)
    # a dtype safetensors knows but brmerge cannot read is named, also as one line
    u16 = _write(tmp_path / "u16.safetensors", {"a": {"dtype": "U16", "shape": [4], "data_offsets": [0, 8]}},
                 b"\0" * 8)
    assert _library_accepts(u16)
    with pytest.raises(BrmergeError, match="U16, which brmerge cannot read"):
        read_header(u16)


def test_cli_merge_of_a_lying_file_exits_2_naming_file_and_tensor(tiny_zoo, tmp_path):
    ft = tmp_path / "ft"
    shutil.copytree(tiny_zoo["ft_a"], ft)
    _norm_last(tiny_zoo["ft_a"] / "model.safetensors", ft / "model.safetensors")
    header, body = _split(ft / "model.safetensors")
    s = header[NORM]["data_offsets"][0]
    header[NORM]["data_offsets"] = [s, s + 16]
    _write(ft / "model.safetensors", header, body[:s + 16])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(tiny_zoo["base"]), "parameters": {"weight": 0.5}},
        {"model": str(ft), "parameters": {"weight": 0.5}}]}))
    res = subprocess.run([sys.executable, "-m", "search", "merge", str(recipe), "--out", str(tmp_path / "m"),
                          "--device", "cpu"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and NORM in res.stderr and str(ft / "model.safetensors") in res.stderr
    assert not (tmp_path / "m").exists()
