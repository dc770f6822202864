"""Cell ids: one file name per grid point, unique within a sweep and stable across runs.

An id reads ``width=4,depth=1,lr=0.001``: each axis's name and a token for its value,
made of the characters ``A-Z a-z 0-9 . + _ -`` only (anything else becomes ``_``), so an
id never holds a path separator and ``,`` and ``=`` only ever separate axes. A float's
token is its shortest ``%g`` form when that reads back as the same number, else its
``repr`` (the shortest text that reads back exactly, the same on every Python since 3.1):
``0.001`` and ``0.0010000001`` stay apart. Two values of one axis with the same token
(``1`` and ``1.0``, ``"a b"`` and ``"a_b"``) would share every file, so the config that
holds them is refused (:func:`check_grid_ids`). An id longer than :data:`MAX_ID_CHARS`
keeps its start and ends with a hash of the whole (a file name's limit is 255 bytes).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

#: Longest id: room for the ``.json`` / ``.db-journal`` suffixes within a 255-byte name.
MAX_ID_CHARS = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9.+_-]")


def value_token(value: Any) -> str:
    """The text of one grid value inside a cell id (see the module's docstring)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        text = f"{value:g}"
        try:
            exact = float(text) == value
        except ValueError:
            exact = False
        return _UNSAFE.sub("_", text if exact else repr(value))
    if isinstance(value, list):
        return "x".join(value_token(v) for v in value)
    return _UNSAFE.sub("_", str(value))


def key_token(key: str) -> str:
    """The text of an axis's name inside a cell id."""
    return _UNSAFE.sub("_", key)


def cell_id(params: dict[str, Any]) -> str:
    """``width=4,depth=1,...``: a file name, the same for the same values on every run."""
    text = ",".join(f"{key_token(k)}={value_token(v)}" for k, v in params.items()) or "cell"
    if len(text) > MAX_ID_CHARS:
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        text = f"{text[:MAX_ID_CHARS - len(digest) - 1]}-{digest}"
    return text


def check_grid_ids(grid: dict[str, list[Any]]) -> str | None:
    """The one-line reason two cells of ``grid`` would share an id, or None.

    Ids are unique when the axes' names differ as tokens and, on each axis, the values'
    tokens differ: an id then spells every axis's value apart (its separators never occur
    inside a token), so two cells with the same id are the same grid point.
    """
    names: dict[str, str] = {}
    for key in grid:
        token = key_token(key)
        if token in names:
            return (f"[grid] {key}: expected axis names that differ in the cell ids, got "
                    f"{names[token]!r} and {key!r}, which both read {token!r}")
        names[token] = key
    for key, values in grid.items():
        seen: dict[str, Any] = {}
        for value in values:
            token = value_token(value)
            if token in seen:
                return (f"[grid] {key}: expected distinct values (each one names the cell's "
                        f"files), got {seen[token]!r} and {value!r}, which both read "
                        f"{token!r}")
            seen[token] = value
    return None
