"""What a record store holds: its SQL schema, the records as Python objects, and the checks
that turn a row read back from a file into one of them.

SQLite is dynamically typed, so a damaged or hand-edited file can hold text where a step
belongs or a JSON column that is not an object. Every row read back goes through
:func:`run_info`, :func:`value_of`, :func:`record_of` or :func:`export_row`, which either
return well-typed values or raise one-line :class:`StoreError` naming the table, the column
and the row.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import InputError

#: The schema this cvcore writes and the newest it reads. Version 2 added the
#: ``convention`` column of ``measurements`` and the ``arrays`` table; a writer upgrades a
#: version-1 store in place (:data:`UPGRADES`), readers read either without writing.
SCHEMA_VERSION = 2
#: The value of the ``format`` key that marks a cvcore record store.
FORMAT = "cvcore-records"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL,
    closed REAL,
    host TEXT, pid INTEGER,
    model_class TEXT, framework TEXT, n_params INTEGER,
    kernel TEXT NOT NULL, dtype TEXT NOT NULL, cvcore_version TEXT NOT NULL,
    probe_sets TEXT NOT NULL, options TEXT NOT NULL, tags TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    step INTEGER NOT NULL,
    loss REAL,
    extras TEXT NOT NULL,
    seconds REAL NOT NULL,
    time REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS measurements (
    record_id INTEGER NOT NULL REFERENCES records(id),
    probe_set TEXT NOT NULL,
    subset INTEGER,
    label TEXT,
    variable TEXT NOT NULL,
    value REAL,
    std REAL,
    count INTEGER NOT NULL,
    convention TEXT
);
CREATE TABLE IF NOT EXISTS arrays (
    record_id INTEGER NOT NULL REFERENCES records(id),
    probe_set TEXT NOT NULL,
    subset INTEGER,
    label TEXT,
    variable TEXT NOT NULL,
    data TEXT NOT NULL,
    convention TEXT
);
CREATE INDEX IF NOT EXISTS records_run ON records(run_id, step);
CREATE INDEX IF NOT EXISTS measurements_record ON measurements(record_id);
CREATE INDEX IF NOT EXISTS arrays_record ON arrays(record_id);
"""

#: The statements that take a store from version ``v`` to ``v + 1``, run by a writer in
#: one transaction with the new ``schema_version`` (SQLite's DDL is transactional, so a
#: writer killed half-way leaves the store as it was).
UPGRADES: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE measurements ADD COLUMN convention TEXT",
        ("CREATE TABLE IF NOT EXISTS arrays (record_id INTEGER NOT NULL REFERENCES records(id), "
         "probe_set TEXT NOT NULL, subset INTEGER, label TEXT, variable TEXT NOT NULL, "
         "data TEXT NOT NULL, convention TEXT)"),
        "CREATE INDEX IF NOT EXISTS arrays_record ON arrays(record_id)"),
}

#: The columns every table of a store must have (what the readers select).
COLUMNS: dict[str, tuple[str, ...]] = {
    "meta": ("key", "value"),
    "runs": ("id", "name", "source", "created", "closed", "host", "pid", "model_class",
             "framework", "n_params", "kernel", "dtype", "cvcore_version", "probe_sets",
             "options", "tags"),
    "records": ("id", "run_id", "step", "loss", "extras", "seconds", "time"),
    "measurements": ("record_id", "probe_set", "subset", "label", "variable", "value", "std",
                     "count", "convention"),
    "arrays": ("record_id", "probe_set", "subset", "label", "variable", "data", "convention"),
}
#: What each schema version added to :data:`COLUMNS` (a store of an older version is
#: read without them).
ADDED: dict[int, dict[str, tuple[str, ...]]] = {
    2: {"measurements": ("convention",), "arrays": COLUMNS["arrays"]},
}


def columns_of(version: int) -> dict[str, tuple[str, ...]]:
    """The tables and columns a store of schema ``version`` must have.

    >>> sorted(columns_of(1)), columns_of(1)["measurements"][-1]
    (['measurements', 'meta', 'records', 'runs'], 'count')
    """
    out = {table: list(cols) for table, cols in COLUMNS.items()}
    for added_in, tables in ADDED.items():
        if version < added_in:
            for table, cols in tables.items():
                out[table] = [c for c in out[table] if c not in cols]
    return {table: tuple(cols) for table, cols in out.items() if cols}


class StoreError(InputError):
    """A file is not a cvcore record store, is locked, is damaged, or comes from a newer
    schema."""


@dataclass(frozen=True)
class Value:
    """One number of one record.

    Attributes:
        probe_set: the probe set's name (``"probe"`` when only one was given).
        variable: a :class:`cvcore.CollectiveVariables` field name.
        value: the variable; for the summary of subsets, their mean.
        subset: the subset's index, or ``None`` for the whole probe set / the summary.
        label: the class of a class-wise kernel, else ``None``.
        std: the standard deviation over subsets (``ddof=1``) for a summary, else ``None``.
        count: how many kernels the value summarises (``K`` for a subset summary, else 1).
        convention: how the value was defined, in words (schema 2; the kernel-dynamics
            values carry one); ``None``: the run's ``kernel`` and the definitions of
            :class:`cvcore.CollectiveVariables`.
    """

    probe_set: str
    variable: str
    value: float
    subset: int | None = None
    label: str | None = None
    std: float | None = None
    count: int = 1
    convention: str | None = None


@dataclass(frozen=True)
class ArrayValue:
    """One array of one record (schema 2), e.g. ``top_eigenvalues``.

    Attributes:
        probe_set, subset, label: where it was measured, as for :class:`Value`.
        variable: the array's name.
        data: its numbers (NaN where undefined).
        convention: how it was defined, in words.
    """

    probe_set: str
    variable: str
    data: tuple[float, ...]
    subset: int | None = None
    label: str | None = None
    convention: str | None = None


@dataclass(frozen=True)
class Record:
    """What one :meth:`Recorder.record` call stored: every value of one step."""

    step: int
    values: tuple[Value, ...]
    loss: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    time: float = 0.0
    arrays: tuple[ArrayValue, ...] = ()

    def get(self, variable: str, probe_set: str | None = None, label: str | None = None) -> float:
        """A summary value (subset mean, or the whole probe's value) of one variable.

        Raises:
            KeyError: no such value in this record.
        """
        for v in self.values:
            if v.variable == variable and v.subset is None and v.label == label and (
                    probe_set is None or v.probe_set == probe_set):
                return v.value
        raise KeyError(f"no {variable!r} for probe set {probe_set!r}, label {label!r}")

    def array(self, variable: str, probe_set: str | None = None, label: str | None = None,
              subset: int | None = None) -> NDArray[np.float64]:
        """One stored array (e.g. ``top_eigenvalues``) as a float64 NumPy array.

        Raises:
            KeyError: no such array in this record.
        """
        for a in self.arrays:
            if a.variable == variable and a.subset == subset and a.label == label and (
                    probe_set is None or a.probe_set == probe_set):
                return np.asarray(a.data, dtype=np.float64)
        raise KeyError(f"no array {variable!r} for probe set {probe_set!r}, label {label!r}, "
                       f"subset {subset!r}")

    def convention(self, variable: str, probe_set: str | None = None,
                   label: str | None = None) -> str | None:
        """The convention text stored with a summary value or an array (``None`` when the
        value has none: the run's kernel and the usual definitions apply).

        Raises:
            KeyError: no such value or array in this record.
        """
        found: list[Value | ArrayValue] = [*self.values, *self.arrays]
        for v in found:
            if v.variable == variable and v.subset is None and v.label == label and (
                    probe_set is None or v.probe_set == probe_set):
                return v.convention
        raise KeyError(f"no {variable!r} for probe set {probe_set!r}, label {label!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, ready for JSON (``arrays`` only when the record has some)."""
        out = {"step": self.step, "loss": self.loss, "extras": self.extras,
               "seconds": self.seconds, "time": self.time,
               "values": [asdict(v) for v in self.values]}
        if self.arrays:
            out["arrays"] = [{**asdict(a), "data": list(a.data)} for a in self.arrays]
        return out


@dataclass(frozen=True)
class RunInfo:
    """A run's metadata (one row of the ``runs`` table)."""

    id: int
    name: str
    source: str
    created: float
    closed: float | None
    host: str | None
    pid: int | None
    model_class: str | None
    framework: str | None
    n_params: int | None
    kernel: str
    dtype: str
    cvcore_version: str
    probe_sets: dict[str, Any]
    options: dict[str, Any]
    tags: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, ready for JSON."""
        return asdict(self)


class _Row:
    """One row read back, with typed accessors that name the place of a bad value."""

    def __init__(self, path: str, table: str, row: sqlite3.Row, key: str | None) -> None:
        self.path, self.table, self.row = path, table, row
        self.where = f"{table} row {repr(row[key])[:30]}" if key is not None else f"a {table} row"

    def bad(self, column: str, expected: str, got: Any) -> StoreError:
        text = repr(got)
        shown = text if len(text) <= 40 else f"{type(got).__name__} {text[:30]}..."
        return StoreError(f"expected a cvcore record store, got a damaged one: {self.path}: "
                          f"{self.where}, column {column}: expected {expected}, got {shown}")

    def _get(self, column: str, kinds: tuple[type, ...], expected: str, null: bool) -> Any:
        value = self.row[column]
        if value is None and null:
            return None
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise self.bad(column, expected + (" or NULL" if null else ""), value)
        return value

    def integer(self, column: str) -> int:
        return int(self._get(column, (int,), "an integer", False))

    def opt_integer(self, column: str) -> int | None:
        value = self._get(column, (int,), "an integer", True)
        return None if value is None else int(value)

    def number(self, column: str) -> float:
        return float(self._get(column, (int, float), "a number", False))

    def opt_number(self, column: str) -> float | None:
        value = self._get(column, (int, float), "a number", True)
        return None if value is None else float(value)

    def string(self, column: str) -> str:
        return str(self._get(column, (str,), "text", False))

    def opt_string(self, column: str) -> str | None:
        value = self._get(column, (str,), "text", True)
        return None if value is None else str(value)

    def opt_text_if_present(self, column: str) -> str | None:
        """A text column a version-1 store lacks (``None`` there)."""
        return self.opt_string(column) if column in self.row.keys() else None  # noqa: SIM118

    def numbers(self, column: str) -> tuple[float, ...]:
        """A JSON array of numbers (``null`` for NaN) as floats."""
        text = self.string(column)
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise self.bad(column, "a JSON array of numbers", text) from None
        if not isinstance(value, list) or not all(
                v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                for v in value):
            raise self.bad(column, "a JSON array of numbers", text)
        try:
            out = tuple(math.nan if v is None else float(v) for v in value)
        except OverflowError:  # an integer beyond float range
            raise self.bad(column, "a JSON array of numbers", text) from None
        if not all(math.isfinite(v) for v, raw in zip(out, value) if raw is not None):
            raise self.bad(column, "a JSON array of numbers", text)  # NaN / Infinity / 1e999
        return out

    def object(self, column: str) -> dict[str, Any]:
        """A JSON object column as a dict."""
        text = self.string(column)
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise self.bad(column, "a JSON object", text) from None
        if not isinstance(value, dict):
            raise self.bad(column, "a JSON object", text)
        return value


def run_info(path: str, row: sqlite3.Row) -> RunInfo:
    """A ``runs`` row as a :class:`RunInfo`, or :class:`StoreError` naming a bad column."""
    r = _Row(path, "runs", row, "id")
    return RunInfo(
        id=r.integer("id"), name=r.string("name"), source=r.string("source"), created=r.number("created"),
        closed=r.opt_number("closed"), host=r.opt_string("host"), pid=r.opt_integer("pid"),
        model_class=r.opt_string("model_class"), framework=r.opt_string("framework"),
        n_params=r.opt_integer("n_params"), kernel=r.string("kernel"), dtype=r.string("dtype"),
        cvcore_version=r.string("cvcore_version"), probe_sets=r.object("probe_sets"),
        options=r.object("options"), tags=r.object("tags"))


def value_of(path: str, row: sqlite3.Row) -> tuple[int, Value]:
    """A ``measurements`` row as (record id, :class:`Value`)."""
    r = _Row(path, "measurements", row, "record_id")
    value, count = r.opt_number("value"), r.integer("count")
    if count < 1:
        raise r.bad("count", "a positive integer", count)
    return r.integer("record_id"), Value(
        probe_set=r.string("probe_set"), variable=r.string("variable"),
        value=math.nan if value is None else value, subset=r.opt_integer("subset"),
        label=r.opt_string("label"), std=r.opt_number("std"), count=count,
        convention=r.opt_text_if_present("convention"))


def array_of(path: str, row: sqlite3.Row) -> tuple[int, ArrayValue]:
    """An ``arrays`` row as (record id, :class:`ArrayValue`)."""
    r = _Row(path, "arrays", row, "record_id")
    return r.integer("record_id"), ArrayValue(
        probe_set=r.string("probe_set"), variable=r.string("variable"), data=r.numbers("data"),
        subset=r.opt_integer("subset"), label=r.opt_string("label"),
        convention=r.opt_string("convention"))


def record_of(path: str, row: sqlite3.Row, values: Sequence[Value],
              arrays: Sequence[ArrayValue] = ()) -> Record:
    """A ``records`` row, its values and its arrays as a :class:`Record`."""
    r = _Row(path, "records", row, "id")
    return Record(step=r.integer("step"), values=tuple(values), loss=r.opt_number("loss"),
                  extras=r.object("extras"), seconds=r.number("seconds"), time=r.number("time"),
                  arrays=tuple(arrays))


def export_row(path: str, row: sqlite3.Row) -> dict[str, Any]:
    """One row of :meth:`RecordStore.rows` (a value with its record and run), checked;
    ``index`` is ``None`` (see :func:`export_array_rows`), ``convention`` ``None`` in a
    version-1 store."""
    r = _Row(path, "records", row, "record_id")
    out: dict[str, Any] = {
        "run_id": r.integer("run_id"), "run_name": r.string("run_name"), "step": r.integer("step"),
        "probe_set": r.string("probe_set"), "subset": r.opt_integer("subset"),
        "label": r.opt_string("label"), "variable": r.string("variable"), "index": None,
        "value": r.opt_number("value"), "std": r.opt_number("std"), "count": r.integer("count"),
        "loss": r.opt_number("loss"), "seconds": r.number("seconds"), "time": r.number("time")}
    r.object("extras")  # checked, kept as the JSON text it is
    out["extras"] = row["extras"]
    out["convention"] = r.opt_text_if_present("convention")
    return out


def export_array_rows(path: str, row: sqlite3.Row) -> list[dict[str, Any]]:
    """One stored array as rows of :meth:`RecordStore.rows`: one per element, its position
    (from 0) in ``index``, ``std`` NULL and ``count`` 1."""
    r = _Row(path, "arrays", row, "record_id")
    base: dict[str, Any] = {
        "run_id": r.integer("run_id"), "run_name": r.string("run_name"), "step": r.integer("step"),
        "probe_set": r.string("probe_set"), "subset": r.opt_integer("subset"),
        "label": r.opt_string("label"), "variable": r.string("variable")}
    data = r.numbers("data")
    tail: dict[str, Any] = {"std": None, "count": 1, "loss": r.opt_number("loss"),
            "seconds": r.number("seconds"), "time": r.number("time")}
    r.object("extras")
    tail["extras"] = row["extras"]
    tail["convention"] = r.opt_string("convention")
    return [{**base, "index": i, "value": None if math.isnan(v) else v, **tail}
            for i, v in enumerate(data)]


__all__: Sequence[str] = ["ADDED", "COLUMNS", "FORMAT", "SCHEMA", "SCHEMA_VERSION", "UPGRADES",
                          "ArrayValue", "Record", "RunInfo", "StoreError", "Value", "array_of",
                          "columns_of", "export_array_rows", "export_row", "record_of",
                          "run_info", "value_of"]
