"""The record store: runs and their records in one SQLite file, safe against crashes.

SQLite (standard library) in WAL mode, one transaction per record: a writer killed at
any instant leaves every completed record readable, readers see a consistent file while
a run is being written, and a resumed run appends to the same file. The schema is in
``docs/recording.md`` (and :mod:`cvcore.record.schema`); :data:`SCHEMA_VERSION` is stored in
the file and a newer one is refused. Readers open a store read-only and change nothing on
disk; every row read back is type-checked, so a damaged file is one :class:`StoreError`.
"""

from __future__ import annotations

import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from numpy.typing import NDArray

from cvcore.record.schema import (
    FORMAT,
    SCHEMA,
    SCHEMA_VERSION,
    ArrayValue,
    Record,
    RunInfo,
    StoreError,
    Value,
    array_of,
    columns_of,
    export_array_rows,
    export_row,
    record_of,
    run_info,
    value_of,
)
from cvcore.record.store_files import (
    _finite_or_none,
    _json,
    _numbers_json,
    _plain,
    _signature,
    _wal_header,
    upgrade,
)

#: Seconds a writer waits for another one's transaction before reporting the lock.
DEFAULT_TIMEOUT = 10.0
#: How many times a reader opens a store again when a writer changed it during a read.
READ_ATTEMPTS = 3


class RecordStore:
    """One SQLite record store file: create, append, read.

    A store opened with ``create=False`` is opened for reading only, and reading changes
    nothing on disk: not the file, not its folder (no ``-wal`` or ``-shm`` file appears),
    not its journal mode. A store in WAL mode with no ``-wal`` file beside it (no writer
    has it open) is read as an immutable file, checked after every query for a writer
    that started meanwhile (then it is opened again, the normal way, and the query
    repeated); any other store is opened with SQLite's ``mode=ro``, which reads the
    committed records of a writer that is running. The first write to a store opened
    for reading opens it again for writing.

    Args:
        path: a file ending in ``.db``, or ``":memory:"`` for a store that is not kept.
        create: create the file when it does not exist; ``False`` opens an existing
            store for reading.
        timeout: seconds to wait for another writer's transaction before
            :class:`StoreError`.

    Raises:
        StoreError: the file is not a cvcore store, is locked, is damaged, or has a newer
            schema.
    """

    def __init__(self, path: str | Path, *, create: bool = True,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = str(path)
        self.timeout = timeout
        memory = self.path == ":memory:"
        if not memory and not self.path.endswith(".db"):
            raise StoreError(f"expected a record store path ending in .db, got {self.path!r}")
        exists = memory or Path(self.path).exists()
        if not exists and not create:
            raise StoreError(f"expected an existing record store, got no file at {self.path}")
        if not memory and Path(self.path).is_dir():
            raise StoreError(f"expected a record store file, got a directory: {self.path}")
        #: ``True`` while the store is open for reading only.
        self.readonly = not create and not memory
        self._signature: tuple[int, ...] | None = None
        if self.readonly:
            self._connect_reader()
        else:
            self._connect_writer()
        try:
            if self.readonly:
                self._check()
            else:
                self._open_for_writing(create)
        except BaseException:
            self.conn.close()
            raise

    # -- opening ---------------------------------------------------------------------

    def _connect(self, target: str, *, uri: bool) -> None:
        try:
            self.conn = sqlite3.connect(target, timeout=self.timeout, isolation_level=None,
                                        check_same_thread=False, uri=uri)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open record store {self.path}: {exc}") from None
        self.conn.row_factory = sqlite3.Row

    def _connect_reader(self) -> None:
        """Open the file read-only (immutable when no writer has it open)."""
        real = os.path.realpath(self.path)
        try:
            immutable = _wal_header(real) and not os.path.lexists(real + "-wal")
        except OSError as exc:
            raise StoreError(f"cannot read record store {self.path}: {exc.strerror}") from None
        self._signature = _signature(real) if immutable else None
        self._connect(f"file:{quote(real)}?mode=ro" + ("&immutable=1" if immutable else ""),
                      uri=True)

    def _connect_writer(self) -> None:
        self._signature = None
        self._connect(self.path, uri=False)

    def _open_for_writing(self, create: bool) -> None:
        """A writer's opening: the file checked as a store (or created), then an older
        schema upgraded in place (:func:`cvcore.record.store_files.upgrade`, one
        transaction) and checked again."""
        self._init(create)
        self._check()
        if self.schema_version < SCHEMA_VERSION:
            with self._translate("upgrade the store's schema"):
                upgrade(self.conn)
            self._check()

    def _init(self, create: bool) -> None:
        """Writers only: check the file is a store (or empty) before anything is written,
        then switch it to WAL mode and create the schema in a new file."""
        empty = not self._tables()
        with self._translate("open"):
            if self.path != ":memory:":
                mode = self.conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"cannot switch {self.path} to WAL mode (got {mode})")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            if empty and create:
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

    def _tables(self) -> set[str]:
        """The file's tables; :class:`StoreError` for a file that is not SQLite or holds
        another application's tables."""
        tables = {r[0] for r in self._query(
            "read the list of tables", "SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and "meta" not in tables:
            shown = sorted(str(t) for t in tables)
            raise StoreError(f"expected a cvcore record store, got an SQLite file without "
                             f"cvcore's tables: {self.path} (tables {shown[:8]})")
        return tables

    def _check(self) -> None:
        """The format, the schema version and every table's columns, or :class:`StoreError`."""
        if not self._tables():
            raise StoreError(f"expected a cvcore record store, got an empty SQLite file: "
                             f"{self.path}")
        meta = {str(r[0]): r[1] for r in self._query("read the store's metadata",
                                                      "SELECT key, value FROM meta")}
        if meta.get("format") != FORMAT:
            raise StoreError(f"expected a cvcore record store (format {FORMAT!r}), got "
                             f"format {str(meta.get('format'))[:40]!r} in {self.path}")
        text = meta.get("schema_version", "0")
        if not isinstance(text, str) or not text.isascii() or not text.isdigit():
            raise StoreError(f"expected a cvcore record store, got a damaged one: {self.path}: "
                             f"schema_version is {str(text)[:40]!r}, not an integer")
        version = int(text)
        if version > SCHEMA_VERSION:
            raise StoreError(f"expected a record store of schema version {SCHEMA_VERSION} or "
                             f"older, got version {version} in {self.path}; upgrade cvcore")
        #: the schema version of the file (a reader leaves an older one as it is)
        self.schema_version = version
        for table, columns in columns_of(version).items():
            have = {r[1] for r in self._query("read the schema", f"PRAGMA table_info({table})")}
            missing = [c for c in columns if c not in have]
            if missing:
                raise StoreError(f"expected a cvcore record store, got a damaged one: "
                                 f"{self.path}: table {table} lacks columns {missing}")

    def _moved(self) -> bool:
        """Whether a file read as immutable has been written to since it was opened."""
        return self._signature is not None and \
            _signature(os.path.realpath(self.path)) != self._signature

    def _query(self, what: str, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Every row of one query; SQLite's errors as one-line :class:`StoreError`.

        A store read as immutable that a writer changed meanwhile is opened again and the
        query repeated, so a reader never returns rows from a file changing under it.
        """
        for _ in range(READ_ATTEMPTS):
            try:
                rows = self.conn.execute(sql, tuple(args)).fetchall()
            except (sqlite3.Error, UnicodeDecodeError) as exc:  # text that is not UTF-8
                if not self._moved():
                    raise self._error(what, exc) from None
            else:
                if not self._moved():
                    return rows
            self.conn.close()
            self._connect_reader()
        raise StoreError(f"record store {self.path} kept changing while it was read "
                         f"({READ_ATTEMPTS} attempts); read it again")

    def _error(self, what: str, exc: sqlite3.Error | UnicodeDecodeError) -> StoreError:
        """One SQLite error as a one-line :class:`StoreError`."""
        text = " ".join(str(exc).split())
        if isinstance(exc, UnicodeDecodeError):
            return StoreError(f"expected a cvcore record store, got a damaged one: {self.path}: "
                              f"could not {what}: text that is not UTF-8 ({text[:80]})")
        if isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text):
            return StoreError(f"record store {self.path} is locked by another writer "
                              f"(could not {what} within the timeout)")
        if isinstance(exc, sqlite3.OperationalError) and not any(
                word in text for word in ("malformed", "not a database", "corrupt")):
            return StoreError(f"record store {self.path}: could not {what}: {text}")
        return StoreError(f"expected a cvcore record store (SQLite), got a file that is not "
                          f"one or is damaged: {self.path} ({text})")

    @contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        """SQLite's errors as one-line :class:`StoreError` messages."""
        try:
            yield
        except sqlite3.Error as exc:
            raise self._error(what, exc) from None

    @contextmanager
    def transaction(self, what: str = "write") -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside lands together or not at all."""
        if self.readonly:  # opened for reading: open it again, for writing
            self.conn.close()
            self.readonly = False
            self._connect_writer()
            self._open_for_writing(create=False)
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
                "INSERT INTO measurements (record_id, probe_set, subset, label, variable, "
                "value, std, count, convention) VALUES (?,?,?,?,?,?,?,?,?)",
                [(rid, v.probe_set, v.subset, v.label, v.variable, _finite_or_none(v.value),
                  _finite_or_none(v.std), v.count, v.convention) for v in record.values])
            if record.arrays:
                conn.executemany(
                    "INSERT INTO arrays (record_id, probe_set, subset, label, variable, data, "
                    "convention) VALUES (?,?,?,?,?,?,?)",
                    [(rid, a.probe_set, a.subset, a.label, a.variable, _numbers_json(a.data),
                      a.convention) for a in record.arrays])

    def close_run(self, run_id: int) -> None:
        """Mark a run as finished."""
        with self.transaction("close a run") as conn:
            conn.execute("UPDATE runs SET closed=? WHERE id=?", (time.time(), run_id))

    # -- reading ---------------------------------------------------------------------

    def runs(self) -> list[RunInfo]:
        """Every run in the file, oldest first."""
        rows = self._query("read runs", "SELECT * FROM runs ORDER BY id")
        return [run_info(self.path, r) for r in rows]

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
        recs = self._query("read records",
                           "SELECT * FROM records WHERE run_id=? ORDER BY id", (info.id,))
        meas = self._query(
            "read records", "SELECT m.* FROM measurements m JOIN records r ON "
            "m.record_id = r.id WHERE r.run_id=? ORDER BY m.rowid", (info.id,))
        by_record: dict[int, list[Value]] = {}
        for m in meas:
            record_id, value = value_of(self.path, m)
            by_record.setdefault(record_id, []).append(value)
        arrays: dict[int, list[ArrayValue]] = {}
        if self.schema_version >= 2:  # a version-1 store has no arrays table
            for a in self._query(
                    "read records", "SELECT a.* FROM arrays a JOIN records r ON "
                    "a.record_id = r.id WHERE r.run_id=? ORDER BY a.rowid", (info.id,)):
                record_id, array = array_of(self.path, a)
                arrays.setdefault(record_id, []).append(array)
        return [record_of(self.path, r, by_record.get(r["id"], ()), arrays.get(r["id"], ()))
                for r in recs]

    def rows(self, run: int | str | None = None, *,
             arrays: bool = False) -> list[dict[str, Any]]:
        """Every value of every run (or one), one flat dict each (for CSV / Parquet).

        Keys: ``run_id, run_name, step, probe_set, subset, label, variable, index, value,
        std, count, loss, seconds, time, extras, convention`` (extras as JSON text;
        ``index`` ``None`` for a scalar value, ``convention`` ``None`` where none was
        stored). With ``arrays``, each stored array (``top_eigenvalues`` ...) follows its
        record's values, one row per element with its position in ``index``.
        """
        where, args = ("", ()) if run is None else ("WHERE r.run_id=?", (self.run(run).id,))
        convention = ", m.convention" if self.schema_version >= 2 else ""
        rows = self._query(
            "read records",
            "SELECT r.id AS record_id, r.run_id, u.name AS run_name, r.step, m.probe_set, "
            "m.subset, m.label, m.variable, m.value, m.std, m.count, r.loss, r.seconds, "
            f"r.time, r.extras{convention} FROM measurements m JOIN records r ON "
            f"m.record_id = r.id JOIN runs u ON u.id = r.run_id {where} ORDER BY r.id, m.rowid",
            args)
        out = [export_row(self.path, r) for r in rows]
        if not arrays or self.schema_version < 2:
            return out
        found = self._query(
            "read records",
            "SELECT r.id AS record_id, r.run_id, u.name AS run_name, r.step, a.probe_set, "
            "a.subset, a.label, a.variable, a.data, a.convention, r.loss, r.seconds, r.time, "
            "r.extras FROM arrays a JOIN records r ON a.record_id = r.id JOIN runs u ON "
            f"u.id = r.run_id {where} ORDER BY r.id, a.rowid", args)
        keyed = [(r["record_id"], 0, row) for r, row in zip(rows, out)]
        for a in found:  # each record's arrays after its values (a stable sort)
            keyed += [(a["record_id"], 1, row) for row in export_array_rows(self.path, a)]
        keyed.sort(key=lambda t: (t[0], t[1]))
        return [row for _, _, row in keyed]

    def series(self, run: int | str | None, variable: str, *, probe_set: str | None = None,
               label: str | None = None) -> dict[str, NDArray[Any]]:
        """One variable's summary over the steps of a run (see :func:`series_of`)."""
        return series_of(self.records(run), variable, probe_set=probe_set, label=label)


def series_of(records: Sequence[Record], variable: str, *, probe_set: str | None = None,
              label: str | None = None) -> dict[str, NDArray[Any]]:
    """One variable's summary values (subset means, or whole-probe values) over records.

    Returns:
        NumPy arrays, one entry per record that has the variable: ``step``, ``value``,
        ``std`` (NaN without subsets), ``count`` (K, or 1), ``loss`` (NaN when not given)
        and ``seconds``.
    """
    steps: list[int] = []
    counts: list[int] = []
    rows: list[tuple[float, ...]] = []
    for rec in records:
        for v in rec.values:
            if v.variable == variable and v.subset is None and v.label == label and (
                    probe_set is None or v.probe_set == probe_set):
                steps.append(rec.step)
                counts.append(v.count)
                rows.append((v.value, math.nan if v.std is None else v.std,
                             math.nan if rec.loss is None else rec.loss, rec.seconds))
                break
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    # steps and counts stay integers (a float64 loses steps above 2^53)
    return {"step": np.asarray(steps, dtype=np.int64), "value": arr[:, 0], "std": arr[:, 1],
            "count": np.asarray(counts, dtype=np.int64), "loss": arr[:, 2],
            "seconds": arr[:, 3]}


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


__all__: Sequence[str] = ["DEFAULT_TIMEOUT", "FORMAT", "SCHEMA", "SCHEMA_VERSION", "ArrayValue",
                          "Record", "RecordStore", "RunInfo", "StoreError", "Value", "_plain",
                          "open_store", "read_runs", "series_of"]
