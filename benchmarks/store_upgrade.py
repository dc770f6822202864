"""CPU seconds of the in-place version 1 -> 2 upgrade of a record store.

Builds a version-1 store of 10,000 records x 20 values with the version-1 schema kept in
tests/record/test_schema_v2.py (``V1_DDL``, as cvcore wrote it before version 2), opens it
for writing (which upgrades it in place), then reads every record back.
docs/recording.md, "Upgrading a version-1 store"::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/store_upgrade.py
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/

from cvcore.record import RecordStore
from tests.record.test_schema_v2 import V1_DDL


def build_v1(db: Path, records: int = 10_000, values: int = 20) -> None:
    """A version-1 store: one run, ``records`` records of ``values`` values each."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(V1_DDL)
    conn.execute("INSERT INTO meta VALUES ('format','cvcore-records'),('schema_version','1')")
    conn.execute("INSERT INTO runs (name, source, created, kernel, dtype, cvcore_version, "
                 "probe_sets, options, tags) VALUES "
                 "('r','recorder',1,'traced','float64','0','{}','{}','{}')")
    conn.execute("BEGIN")
    for i in range(records):
        rid = conn.execute("INSERT INTO records (run_id, step, extras, seconds, time) "
                           "VALUES (1,?,'{}',0,0)", (i,)).lastrowid
        conn.executemany("INSERT INTO measurements VALUES (?,?,?,?,?,?,?,?)",
                         [(rid, "train", None, None, f"v{j}", 1.0 * j, None, 1)
                          for j in range(values)])
    conn.execute("COMMIT")
    conn.close()


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    try:
        db = folder / "big.db"
        build_v1(db)
        print(f"version-1 store of 10,000 records x 20 values: {os.path.getsize(db) / 1e6:.1f} MB")
        t0, w0 = time.process_time(), time.perf_counter()
        RecordStore(db).close()  # a writer: upgrades in place
        print(f"upgrade: {time.process_time() - t0:.4f} s CPU, {time.perf_counter() - w0:.4f} s wall")
        t0 = time.process_time()
        with RecordStore(db, create=False) as store:
            n, version = len(store.records()), store.schema_version
        print(f"read back {n} records of schema version {version}: "
              f"{time.process_time() - t0:.2f} s CPU")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
