"""What the record store needs beside SQL: JSON cells, a file's WAL header and signature,
and the in-place upgrade of an older store's schema.

Kept apart from :mod:`cvcore.record.store` so that module stays about opening, writing and
reading a store.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Mapping
from typing import Any

from cvcore.errors import InputError
from cvcore.record.schema import SCHEMA_VERSION, UPGRADES


def _json(value: Any) -> str:
    return json.dumps(value, default=_jsonable, sort_keys=True, allow_nan=True)


def _jsonable(value: Any) -> Any:
    """Extras may hold NumPy or framework scalars: store them as Python numbers."""
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _plain(extras: Mapping[str, Any]) -> dict[str, Any]:
    """Extras as plain JSON values (NumPy and framework scalars become numbers)."""
    try:
        out: dict[str, Any] = json.loads(_json(dict(extras)))
    except (TypeError, ValueError) as exc:
        raise InputError(f"expected JSON-serialisable extras, got {exc}") from None
    return out


def _numbers_json(data: Any) -> str:
    """An array's numbers as a JSON array (NaN and infinities as ``null``: undefined).

    >>> _numbers_json([1.0, float("nan"), 2])
    '[1.0, null, 2.0]'
    """
    return json.dumps([float(v) if math.isfinite(float(v)) else None for v in data])


def _wal_header(path: str) -> bool:
    """Whether SQLite would open a file as a WAL-mode database: its header's magic string
    and read version 2 (byte 19), even in a file shorter than the 100-byte header."""
    with open(path, "rb") as fh:
        head = fh.read(20)
    return len(head) == 20 and head.startswith(b"SQLite format 3\x00") and head[19] == 2


def _signature(path: str) -> tuple[int, ...] | None:
    """What changes when anything writes to a file: its identity, size and times."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _finite_or_none(value: float | None) -> float | None:
    """NaN (a variable not computed) as NULL, which is what SQLite makes of it anyway."""
    return None if value is None or math.isnan(value) else float(value)


def stored_version(conn: sqlite3.Connection) -> int | None:
    """The ``schema_version`` a store's ``meta`` table holds (``None`` when it is not an
    integer: the store's check names that)."""
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    text = "0" if row is None else row[0]
    if not isinstance(text, str) or not text.isascii() or not text.isdigit():
        return None
    return int(text)


def upgrade(conn: sqlite3.Connection) -> int:
    """Bring an older store to :data:`SCHEMA_VERSION`, in place, in one transaction.

    Every statement of :data:`cvcore.record.schema.UPGRADES` from the stored version on,
    and the new ``schema_version``, commit together: a writer killed during the upgrade
    leaves the store at its old version, every value as it was. Only writers call this;
    readers read an older store as it is. The version is read again inside the
    transaction, so two writers never upgrade twice.

    Returns:
        The version the store had (``SCHEMA_VERSION`` when there was nothing to do).
    """
    version = stored_version(conn)
    if version is None or version >= SCHEMA_VERSION:
        return SCHEMA_VERSION if version is None else version
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = stored_version(conn)
        if version is not None and version < SCHEMA_VERSION:
            for step in range(max(version, 1), SCHEMA_VERSION):
                for statement in UPGRADES[step]:
                    conn.execute(statement)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                         (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION if version is None else version
