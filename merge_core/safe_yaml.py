"""Reading the YAML files users write (recipes, campaigns) without letting one exhaust memory.

``yaml.safe_load`` builds an alias (``*a``) as a second reference to the anchored value, so
loading a "billion laughs" document is cheap; walking the result is not: every consumer
(freezing a recipe, hashing it, writing it back) visits each reference again, and nine
levels of ten aliases are a billion values. An alias that refers to its own ancestor makes
a cycle, and the walk never ends. So after loading, the document's size *as expanded* is
counted once per distinct value (linear in the file) and a document that expands beyond
``MAX_EXPANDED_VALUES``, or contains a cycle, is refused with one line. Ordinary anchors
(sharing a parameter block between models) stay allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from merge_core.errors import BrmergeError

# Far above any real recipe or campaign (a 200-layer gradient list is ~1e3 values), far
# below what exhausts memory when expanded (each value costs ~100 bytes once copied).
MAX_EXPANDED_VALUES = 1_000_000


def read_text(path: str | Path, *, error: type[BrmergeError], what: str) -> str:
    """The UTF-8 text of ``path``; ``error`` (one line) when it cannot be read or decoded."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {str(p)!r}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise error(f"{p} line {line}: {what} is not UTF-8 text (byte 0x{raw[e.start]:02x}): "
                    "re-save it as UTF-8") from None


def load(text: str, *, source: str, error: type[BrmergeError]) -> Any:
    """``yaml.safe_load(text)``, refusing invalid YAML and alias bombs with ``error``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise error(f"{source}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except RecursionError:
        raise error(f"{source}: nested too deeply to be a recipe or campaign: flatten it") from None
    size = expanded_size(data)
    if size is None:
        raise error(f"{source}: a YAML alias (*name) refers to a value that contains it (a cycle): "
                    "write the value out instead of the alias")
    if size > MAX_EXPANDED_VALUES:
        raise error(f"{source}: its YAML aliases (*name) expand to more than {MAX_EXPANDED_VALUES} values "
                    "(an alias bomb): write the values out")
    return data


def expanded_size(data: Any) -> int | None:
    """How many values ``data`` has with every shared reference counted each time it is
    reached (its size once copied); None for a cycle. Each distinct container is visited
    once (memoised by identity), with an explicit stack (no recursion limit to hit)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        value, children_done = stack.pop()
        if not isinstance(value, (dict, list)):
            continue
        key = id(value)
        items = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
        if children_done:
            active.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(v), 1) for v in items)
            continue
        if key in sizes:
            continue
        if key in active:
            return None
        active.add(key)
        stack.append((value, True))
        for v in items:
            if isinstance(v, (dict, list)) and id(v) in active:
                return None
            stack.append((v, False))
    return sizes.get(id(data), 1)
