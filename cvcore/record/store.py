"""The record store: runs and their records in one SQLite file, safe against crashes.

SQLite (standard library) in WAL mode, one transaction per record: a writer killed at
any instant leaves every completed record readable, readers see a consistent file while
a run is being written, and a resumed run appends to the same file. The schema is in
``docs/recording.md``; :data:`SCHEMA_VERSION` is stored in the file and a newer one is
refused.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import InputError

#: The schema this cvcore writes and the newest it reads.
SCHEMA_VERSION = 1
#: The value of the ``format`` key that marks a cvcore record store.
FORMAT = "cvcore-records"
#: Seconds a writer waits for another one's transaction before reporting the lock.
DEFAULT_TIMEOUT = 10.0

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
    count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS records_run ON records(run_id, step);
CREATE INDEX IF NOT EXISTS measurements_record ON measurements(record_id);
"""


class StoreError(InputError):
    """A file is not a cvcore record store, is locked, or comes from a newer schema."""


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
    """

    probe_set: str
    variable: str
    value: float
    subset: int | None = None
    label: str | None = None
    std: float | None = None
    count: int = 1


@dataclass(frozen=True)
class Record:
    """What one :meth:`Recorder.record` call stored: every value of one step."""

    step: int
    values: tuple[Value, ...]
    loss: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    time: float = 0.0

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

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, ready for JSON."""
        return {"step": self.step, "loss": self.loss, "extras": self.extras,
                "seconds": self.seconds, "time": self.time,
                "values": [asdict(v) for v in self.values]}


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


def _real(value: Any) -> float | None:
    """A loss as a Python float (tensors and NumPy scalars included), or ``None``."""
    if value is None:
        return None
    item = getattr(value, "item", None)
    number = item() if callable(item) else value
    try:
        return float(number)
    except (TypeError, ValueError):
        raise InputError(f"expected a scalar loss, got {type(value).__name__}") from None


class RecordStore:
    """One SQLite record store file: create, append, read.

    Args:
        path: a file ending in ``.db``, or ``":memory:"`` for a store that is not kept.
        create: create the file when it does not exist (readers pass ``False``).
        timeout: seconds to wait for another writer's transaction before
            :class:`StoreError`.

    Raises:
        StoreError: the file is not a cvcore store, is locked, or has a newer schema.
    """

    def __init__(self, path: str | Path, *, create: bool = True,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = str(path)
        memory = self.path == ":memory:"
        if not memory and not self.path.endswith(".db"):
            raise StoreError(f"expected a record store path ending in .db, got {self.path!r}")
        exists = memory or Path(self.path).exists()
        if not exists and not create:
            raise StoreError(f"expected an existing record store, got no file at {self.path}")
        if not memory and Path(self.path).is_dir():
            raise StoreError(f"expected a record store file, got a directory: {self.path}")
        try:
            self.conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                        check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open record store {self.path}: {exc}") from None
        self.conn.row_factory = sqlite3.Row
        try:
            self._check_or_init(create and not self._is_store())
        except BaseException:
            self.conn.close()
            raise

    # -- opening ---------------------------------------------------------------------

    def _is_store(self) -> bool:
        try:
            tables = {r[0] for r in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"expected a cvcore record store (SQLite), got a file that is not one: "
                f"{self.path} ({exc})") from None
        if not tables:
            return False
        if "meta" not in tables:
            raise StoreError(f"expected a cvcore record store, got an SQLite file without "
                             f"cvcore's tables: {self.path} (tables {sorted(tables)})")
        return True

    def _check_or_init(self, init: bool) -> None:
        with self._translate("open"):
            if self.path != ":memory:":
                mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"cannot switch {self.path} to WAL mode (got {mode})")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            if init:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            self.conn.execute(statement)
                    self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT,))
                    self.conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                                      (str(SCHEMA_VERSION),))
                    self.conn.execute("COMMIT")
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
            if not self._is_store():
                raise StoreError(f"expected a cvcore record store, got an empty SQLite file: "
                                 f"{self.path}")
            meta = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT:
            raise StoreError(f"expected a cvcore record store (format {FORMAT!r}), got "
                             f"format {meta.get('format')!r} in {self.path}")
        version = int(meta.get("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise StoreError(f"expected a record store of schema version {SCHEMA_VERSION} or "
                             f"older, got version {version} in {self.path}; upgrade cvcore")
        self.schema_version = version

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """SQLite's errors as one-line :class:`StoreError` messages."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreError(f"record store {self.path} is locked by another writer "
                                 f"(could not {what} within the timeout)") from None
            raise StoreError(f"record store {self.path}: could not {what}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"expected a cvcore record store (SQLite), got a file that is not "
                             f"one: {self.path} ({exc})") from None

    @contextmanager
    def transaction(self, what: str = "write") -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside lands together or not at all."""
        with self._translate(what):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connection (the file stays valid whether or not this is called)."""
        self.conn.close()

    def __enter__(self) -> RecordStore:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------

    def create_run(self, *, name: str, source: str, kernel: str, dtype: str,
                   cvcore_version: str, probe_sets: Mapping[str, Any],
                   options: Mapping[str, Any] | None = None,
                   tags: Mapping[str, Any] | None = None) -> int:
        """Add a run; returns its id."""
        with self.transaction("create a run") as conn:
            cur = conn.execute(
                "INSERT INTO runs (name, source, created, host, pid, kernel, dtype, "
                "cvcore_version, probe_sets, options, tags) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (name, source, time.time(), socket.gethostname(), os.getpid(), kernel, dtype,
                 cvcore_version, _json(dict(probe_sets)), _json(dict(options or {})),
                 _json(dict(tags or {}))))
            run_id = cur.lastrowid
        assert run_id is not None
        return int(run_id)

    def find_run(self, name: str) -> RunInfo | None:
        """The latest run called ``name``, if any."""
        runs = [r for r in self.runs() if r.name == name]
        return runs[-1] if runs else None

    def reopen_run(self, run_id: int) -> None:
        """Mark a run as being written again (resume): this process, not closed."""
        with self.transaction("resume a run") as conn:
            conn.execute("UPDATE runs SET closed=NULL, host=?, pid=? WHERE id=?",
                         (socket.gethostname(), os.getpid(), run_id))

    def set_model(self, run_id: int, *, model_class: str | None, framework: str | None,
                  n_params: int | None) -> None:
        """Fill in what is known about the model once it is first seen."""
        with self.transaction("describe the model") as conn:
            conn.execute("UPDATE runs SET model_class=?, framework=?, n_params=? WHERE id=?",
                         (model_class, framework, n_params, run_id))

    def add_record(self, run_id: int, record: Record, *,
                   model: Mapping[str, Any] | None = None) -> None:
        """Store one record (and, optionally, the model's description) in one transaction."""
        with self.transaction("write a record") as conn:
            if model is not None:
                conn.execute("UPDATE runs SET model_class=?, framework=?, n_params=? WHERE id=?",
                             (model.get("model_class"), model.get("framework"),
                              model.get("n_params"), run_id))
            cur = conn.execute(
                "INSERT INTO records (run_id, step, loss, extras, seconds, time) "
                "VALUES (?,?,?,?,?,?)",
                (run_id, int(record.step), record.loss, _json(record.extras),
                 float(record.seconds), float(record.time)))
            rid = cur.lastrowid
            conn.executemany(
                "INSERT INTO measurements VALUES (?,?,?,?,?,?,?,?)",
                [(rid, v.probe_set, v.subset, v.label, v.variable, _finite_or_none(v.value),
                  _finite_or_none(v.std), v.count) for v in record.values])

    def close_run(self, run_id: int) -> None:
        """Mark a run as finished."""
        with self.transaction("close a run") as conn:
            conn.execute("UPDATE runs SET closed=? WHERE id=?", (time.time(), run_id))

    # -- reading ---------------------------------------------------------------------

    def runs(self) -> list[RunInfo]:
        """Every run in the file, oldest first."""
        with self._translate("read runs"):
            rows = self.conn.execute("SELECT * FROM runs ORDER BY id").fetchall()
        decoded = ("probe_sets", "options", "tags")
        return [RunInfo(**{k: json.loads(r[k]) if k in decoded else r[k]
                           for k in r.keys()})  # noqa: SIM118 - a Row iterates its values
                for r in rows]

    def run(self, run: int | str | None = None) -> RunInfo:
        """One run by id or name (the latest of that name); ``None`` when there is one run.

        Raises:
            StoreError: no such run, or ``None`` and the file holds several.
        """
        runs = self.runs()
        if run is None:
            if len(runs) != 1:
                raise StoreError(f"expected a run id or name for {self.path}, which holds "
                                 f"{len(runs)} runs: {[r.name for r in runs]}")
            return runs[0]
        picked = [r for r in runs if r.id == run or r.name == run or str(r.id) == str(run)]
        if not picked:
            raise StoreError(f"expected a run among {[(r.id, r.name) for r in runs]} in "
                             f"{self.path}, got {run!r}")
        return picked[-1]

    def records(self, run: int | str | None = None) -> list[Record]:
        """Every record of one run, in the order written (so resumed runs append)."""
        info = self.run(run)
        with self._translate("read records"):
            recs = self.conn.execute(
                "SELECT * FROM records WHERE run_id=? ORDER BY id", (info.id,)).fetchall()
            meas = self.conn.execute(
                "SELECT m.* FROM measurements m JOIN records r ON m.record_id = r.id "
                "WHERE r.run_id=? ORDER BY m.rowid", (info.id,)).fetchall()
        by_record: dict[int, list[Value]] = {}
        for m in meas:
            by_record.setdefault(m["record_id"], []).append(Value(
                probe_set=m["probe_set"], variable=m["variable"],
                value=math.nan if m["value"] is None else m["value"], subset=m["subset"],
                label=m["label"], std=m["std"], count=m["count"]))
        return [Record(step=r["step"], values=tuple(by_record.get(r["id"], ())), loss=r["loss"],
                       extras=json.loads(r["extras"]), seconds=r["seconds"], time=r["time"])
                for r in recs]

    def rows(self, run: int | str | None = None) -> list[dict[str, Any]]:
        """Every value of every run (or one), one flat dict each (for CSV / Parquet).

        Keys: ``run_id, run_name, step, probe_set, subset, label, variable, value, std,
        count, loss, seconds, time, extras`` (extras as JSON text).
        """
        where, args = ("", ()) if run is None else ("WHERE r.run_id=?", (self.run(run).id,))
        with self._translate("read records"):
            rows = self.conn.execute(
                "SELECT r.run_id, u.name AS run_name, r.step, m.probe_set, m.subset, m.label, "
                "m.variable, m.value, m.std, m.count, r.loss, r.seconds, r.time, r.extras "
                "FROM measurements m JOIN records r ON m.record_id = r.id "
                f"JOIN runs u ON u.id = r.run_id {where} ORDER BY r.id, m.rowid", args
            ).fetchall()
        return [dict(r) for r in rows]

    def series(self, run: int | str | None, variable: str, *, probe_set: str | None = None,
               label: str | None = None) -> dict[str, NDArray[Any]]:
        """One variable's summary over the steps of a run, as NumPy arrays.

        Returns:
            ``step``, ``value``, ``std`` (NaN without subsets), ``loss`` (NaN when not
            given) and ``seconds``, one entry per record that has the variable.
        """
        out: dict[str, list[float]] = {k: [] for k in ("step", "value", "std", "loss", "seconds")}
        for rec in self.records(run):
            for v in rec.values:
                if v.variable == variable and v.subset is None and v.label == label and (
                        probe_set is None or v.probe_set == probe_set):
                    out["step"].append(rec.step)
                    out["value"].append(v.value)
                    out["std"].append(math.nan if v.std is None else v.std)
                    out["loss"].append(math.nan if rec.loss is None else rec.loss)
                    out["seconds"].append(rec.seconds)
                    break
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}
        arrays["step"] = arrays["step"].astype(np.int64)
        return arrays


def _finite_or_none(value: float | None) -> float | None:
    """NaN (a variable not computed) as NULL, which is what SQLite makes of it anyway."""
    return None if value is None or math.isnan(value) else float(value)


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """Every run of a record store with its records, as plain Python structures.

    Each item is a run's metadata (:class:`RunInfo` fields) plus ``records``: a list of
    :meth:`Record.to_dict` dicts, in the order written.
    """
    with RecordStore(path, create=False) as store:
        return [{**info.to_dict(), "records": [r.to_dict() for r in store.records(info.id)]}
                for info in store.runs()]


def open_store(path: str | Path, *, create: bool = False) -> RecordStore:
    """Open a record store for reading (``create=False``) or writing."""
    return RecordStore(path, create=create)


__all__: Sequence[str] = ["FORMAT", "SCHEMA_VERSION", "Record", "RecordStore", "RunInfo",
                          "StoreError", "Value", "open_store", "read_runs"]
