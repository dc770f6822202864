"""Record store schema version 2: the ``convention`` column and the ``arrays`` table, the
in-place upgrade of a version-1 store (by writers only, in one transaction), readers of a
version-1 store that change nothing, and crafted version-2 stores refused in one line."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cvcore
from cvcore.errors import CVCoreError
from cvcore.record import SCHEMA_VERSION, ArrayValue, Record, RecordStore, StoreError, Value
from cvcore.record.summary import summarize

ODD_VALUES = [None, 0, -1, 2**63 - 1, -(2**63), 1e308, math.inf, -math.inf, "", "x", "{}", "[]",
              "null", '{"a": NaN}', "1", "train", "entropy", b"\xff\x00", "[" * 3000, 3.5]


def cv(*args: object) -> Any:
    from cvcore.cli.app import make_app
    from typer.testing import CliRunner

    return CliRunner().invoke(make_app(), [str(a) for a in args])


def one_line_error(result: Any, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Each file under a folder: its hash, mtime and mode."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns, p.stat().st_mode)
            for p in sorted(folder.rglob("*")) if p.is_file()}

#: The version-1 schema exactly as cvcore wrote it before version 2 (kept here, apart from
#: the code, so the upgrade is tested against what old files hold).
V1_DDL = """
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

#: (probe_set, subset, label, variable, value, std, count) of each record of the v1 store
V1_VALUES = [("train", None, None, "entropy", 1.25, 0.5, 3), ("train", 0, None, "entropy", 1.5,
                                                               None, 1),
             ("test", None, "cat", "trace", 3.0, None, 1), ("test", None, None, "entropy", None,
                                                             None, 1)]


def v1_store(path: Path, *, runs: int = 2, records: int = 3) -> Path:
    """A version-1 store, written the way cvcore wrote one (WAL mode, the v1 tables, one
    transaction per record), closed."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(V1_DDL)
    conn.execute("INSERT INTO meta VALUES ('format', 'cvcore-records')")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    for k in range(runs):
        cur = conn.execute(
            "INSERT INTO runs (name, source, created, host, pid, kernel, dtype, cvcore_version, "
            "probe_sets, options, tags) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (f"run{k}", "recorder", 1.0, "h", 1, "traced", "float64", "0.1",
             json.dumps({"train": {"n_samples": 8}}), "{}", json.dumps({"k": k})))
        run = cur.lastrowid
        for i in range(records):
            conn.execute("BEGIN")
            rid = conn.execute(
                "INSERT INTO records (run_id, step, loss, extras, seconds, time) VALUES "
                "(?,?,?,?,?,?)", (run, 10 * i, 1.0 / (i + 1), '{"lr": 0.1}', 0.01, 2.0)).lastrowid
            conn.executemany("INSERT INTO measurements VALUES (?,?,?,?,?,?,?,?)",
                             [(rid, ps, sub, lab, var, None if val is None else val + i, std, c)
                              for ps, sub, lab, var, val, std, c in V1_VALUES])
            conn.execute("COMMIT")
        conn.execute("UPDATE runs SET closed=5.0 WHERE id=?", (run,))
    conn.close()
    return path


def meta(path: Path) -> dict[str, str]:
    """The meta table, read without writing (immutable: no -wal / -shm file appears)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()


def columns(path: Path, table: str) -> list[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    finally:
        conn.close()


def read_all(db: Path) -> list[Any]:
    """Everything a reader gives, as plain Python (NaN as None so lists compare)."""
    with RecordStore(db, create=False) as store:
        rows = store.rows(arrays=True)
        summary = summarize(store)
    text = json.dumps([cvcore.read_runs(db), rows, summary], default=str)
    return json.loads(text.replace("NaN", "null"))


# -- readers of a version-1 store ------------------------------------------------------


def test_readers_of_a_v1_store_change_nothing_and_see_every_value(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    db = v1_store(folder / "run.db")
    before = snapshot(folder)
    with RecordStore(db, create=False) as store:
        assert store.schema_version == 1
        recs = store.records("run1")
        rows = store.rows(arrays=True)
    assert [r.step for r in recs] == [0, 10, 20] and all(r.arrays == () for r in recs)
    last = recs[-1]
    assert last.get("entropy", "train") == 1.25 + 2 and last.values[0].std == 0.5
    assert last.get("trace", "test", label="cat") == 5.0
    assert math.isnan(last.get("entropy", "test"))
    assert all(v.convention is None for v in last.values)
    assert len(rows) == 2 * 3 * 4 and {r["convention"] for r in rows} == {None}
    assert {r["index"] for r in rows} == {None}
    read_all(db)
    for args in (["report", db], ["report", db, "--json"],
                 ["export", db, "--csv", tmp_path / "t.csv"]):
        result = cv(*args)
        assert result.exit_code == 0, result.output
    assert snapshot(folder) == before  # same names, bytes and mtimes: never upgraded
    assert meta(db)["schema_version"] == "1"


# -- the upgrade -----------------------------------------------------------------------


def test_a_writer_upgrades_a_v1_store_in_place_keeping_every_value(tmp_path: Path) -> None:
    db = v1_store(tmp_path / "run.db")
    old = read_all(db)
    with RecordStore(db) as store:  # a writer: upgraded on opening
        assert store.schema_version == SCHEMA_VERSION == 2
        arrays = (ArrayValue("train", "top_eigenvalues", (3.0, 1.0, math.nan),
                             convention="top 3"),)
        store.add_record(1, Record(30, (Value("train", "entropy", 0.5, convention="c"),),
                                   arrays=arrays))
    assert meta(db)["schema_version"] == "2"
    assert columns(db, "measurements")[-1] == "convention"
    assert columns(db, "arrays") == ["record_id", "probe_set", "subset", "label", "variable",
                                     "data", "convention"]
    conn = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    new = read_all(db)
    runs_old, runs_new = old[0], new[0]
    assert runs_new[1] == runs_old[1]  # run1: every old value identical
    assert runs_new[0]["records"][:3] == runs_old[0]["records"]
    added = runs_new[0]["records"][3]
    assert added["arrays"] == [{"probe_set": "train", "variable": "top_eigenvalues",
                                "data": [3.0, 1.0, None], "subset": None, "label": None,
                                "convention": "top 3"}]
    assert added["values"][0]["convention"] == "c"
    record = RecordStore(db, create=False).records("run0")[-1]
    assert record.array("top_eigenvalues", "train")[:2].tolist() == [3.0, 1.0]
    assert record.convention("entropy", "train") == "c"
    assert new[1][:len(old[1])] == old[1]  # the old rows first, as they were
    assert [r["index"] for r in new[1][len(old[1]):]] == [None, 0, 1, 2]


def test_a_store_opened_for_reading_upgrades_only_at_its_first_write(tmp_path: Path) -> None:
    db = v1_store(tmp_path / "run.db", runs=1, records=1)
    store = RecordStore(db, create=False)
    assert store.schema_version == 1 and meta(db)["schema_version"] == "1"
    store.add_record(1, Record(7, (Value("train", "trace", 1.0),)))
    assert store.schema_version == 2 and [r.step for r in store.records()] == [0, 7]
    store.close()
    assert meta(db)["schema_version"] == "2"


def test_resuming_a_v1_run_with_dynamics_upgrades_and_appends(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(8, 3)
    db = tmp_path / "run.db"
    with cvcore.Recorder(x, sink=db, name="r", variables=["trace"]) as rec:
        rec.record(0, model)
    # make it the version-1 file an older cvcore would have left
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE arrays")
    conn.execute("ALTER TABLE measurements DROP COLUMN convention")
    conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    assert RecordStore(db, create=False).schema_version == 1
    with cvcore.Recorder(x, sink=db, name="r", resume=True, dynamics=True,
                         variables=["trace"]) as rec:
        got = rec.record(1, model)
    recs = RecordStore(db, create=False).records("r")
    assert [r.step for r in recs] == [0, 1] and recs[0].arrays == ()
    assert recs[1].array("top_eigenvalues").tolist() == pytest.approx(
        got.array("top_eigenvalues").tolist())
    assert recs[1].get("trace") == pytest.approx(recs[0].get("trace"))


KILLER = """
import os, signal, sys
from cvcore.record import store_files
from cvcore.record.store import RecordStore

class Dying(tuple):
    def __iter__(self):  # the upgrade's statements: two run, then the writer is killed
        yield from list(tuple.__iter__(self))[:2]
        os.kill(os.getpid(), signal.SIGKILL)

store_files.UPGRADES[1] = Dying(store_files.UPGRADES[1])
RecordStore(sys.argv[1])
"""


def test_a_killed_upgrade_leaves_a_readable_v1_store(tmp_path: Path) -> None:
    db = v1_store(tmp_path / "run.db")
    old = read_all(db)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", KILLER, str(db)], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    assert done.returncode == -9, done.stderr  # killed inside the upgrade's transaction
    assert Path(f"{db}-wal").exists()  # the killed writer's (uncommitted) log is there
    with RecordStore(db, create=False) as store:
        assert store.schema_version == 1
    assert read_all(db) == old  # every value as it was, read as version 1
    assert meta(db)["schema_version"] == "1" and "convention" not in columns(db, "measurements")
    with RecordStore(db) as store:  # the next writer upgrades it
        assert store.schema_version == 2
    assert read_all(db)[0] == old[0]


def test_an_upgrade_never_touches_a_foreign_file_with_a_meta_table(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.executemany("INSERT INTO meta VALUES (?, ?)", [("format", "other"),
                                                        ("schema_version", "1")])
    conn.execute("CREATE TABLE measurements (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="got format 'other'"):
        RecordStore(db)
    assert columns(db, "measurements") == ["x"] and meta(db)["schema_version"] == "1"


# -- crafted and damaged version-2 stores ------------------------------------------------


def v2_store(path: Path) -> Path:
    """A version-2 store with arrays and conventions, written by the store itself."""
    with RecordStore(path) as store:
        run = store.create_run(name="r", source="recorder", kernel="traced", dtype="float64",
                               cvcore_version="t", probe_sets={"train": {}})
        for i in range(3):
            store.add_record(run, Record(i, (
                Value("train", "kernel_distance", 0.1 * i, convention="to the previous"),
                Value("train", "entropy", 1.0)), arrays=(
                ArrayValue("train", "top_eigenvalues", (2.0 + i, 1.0), convention="top 2"),
                ArrayValue("train", "residual_fractions", (0.5, 1.0), subset=0, label="a"))))
    return path


@pytest.mark.parametrize(("sql", "message"), [
    ("UPDATE arrays SET data='[1, \"x\"]'", "column data: expected a JSON array of numbers"),
    ("UPDATE arrays SET data='{\"a\": 1}'", "column data: expected a JSON array of numbers"),
    ("UPDATE arrays SET data='[true]'", "column data: expected a JSON array of numbers"),
    ("UPDATE arrays SET data='[1e999999]'", "column data: expected a JSON array of numbers"),
    ("UPDATE arrays SET data='[NaN]'", "column data: expected a JSON array of numbers"),
    ("UPDATE arrays SET data=5", "column data: expected a JSON array of numbers, got '5'"),
    ("UPDATE arrays SET data=X'00ff'", "column data: expected text, got b'\\x00\\xff'"),
    ("UPDATE arrays SET subset='x'", "arrays row 1, column subset: expected an integer"),
    ("UPDATE arrays SET variable=NULL", "NOT NULL"),
    ("UPDATE arrays SET convention=X'01'", ("column convention: expected text or NULL, got "
                                          "b'\\x01'")),
    ("UPDATE measurements SET convention=X'02'", ("row 1, column convention: expected text or "
                                                "NULL, got b'\\x02'")),
    ("DROP TABLE arrays", "table arrays lacks columns"),
    ("ALTER TABLE measurements DROP COLUMN convention", ("table measurements lacks columns "
                                                       "['convention']")),
    ("UPDATE meta SET value='3' WHERE key='schema_version'",
     "expected a record store of schema version 2 or older, got version 3"),
])
def test_crafted_v2_stores_are_refused_in_one_line(tmp_path: Path, sql: str,
                                                   message: str) -> None:
    db = v2_store(tmp_path / "run.db")
    conn = sqlite3.connect(db)
    try:
        conn.execute(sql)
        conn.commit()
    except sqlite3.IntegrityError as exc:  # SQLite itself keeps NOT NULL
        assert message in str(exc)
        return
    finally:
        conn.close()
    with pytest.raises(StoreError) as err:
        read_all(db)
    assert message in str(err.value) and "\n" not in str(err.value)
    result = cv("report", db, "--json")
    one_line_error(result, message)


V2_TABLES = {"arrays": ("record_id", "probe_set", "subset", "label", "variable", "data",
                        "convention"),
             "measurements": ("convention", "value", "variable")}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(sorted(V2_TABLES)), st.data()), min_size=1,
                      max_size=3))
def test_odd_values_in_v2_cells_are_a_result_or_one_line(edits: Any) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "data"
        folder.mkdir()
        db = v2_store(folder / "s.db")
        conn = sqlite3.connect(db)
        for table, data in edits:
            column = data.draw(st.sampled_from(V2_TABLES[table]))
            value = data.draw(st.sampled_from(ODD_VALUES + ['[1, null, 2.5]', "[[1]]"]))
            with contextlib.suppress(sqlite3.IntegrityError):
                conn.execute(f"UPDATE {table} SET {column}=? WHERE rowid IN (SELECT rowid "
                             f"FROM {table} ORDER BY rowid DESC LIMIT 1)", (value,))
        conn.commit()
        conn.close()
        before = snapshot(folder)
        try:
            read_all(db)
            with RecordStore(db, create=False) as store:
                store.rows()
        except CVCoreError as exc:
            assert "\n" not in str(exc)
        assert snapshot(folder) == before


def dynamics_store(path: Path) -> Path:
    """A store a Recorder with targets, dynamics and subsets wrote (arrays included)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x = torch.randn(12, 4)
    with cvcore.Recorder({"train": x, "test": x[:8]}, targets={"train": torch.arange(12) % 3},
                         dynamics=True, top_k=3, subsets=(2, 6), sink=path, name="dyn",
                         variables=["entropy", "trace"]) as rec:
        for step in range(3):
            rec.record(step, model, loss=1.0 / (step + 1))
            with torch.no_grad():
                model[0].weight.mul_(1.2)
    return path


@pytest.mark.parametrize("command", ["report", "report-json", "plot", "export", "read_runs"])
def test_readers_of_a_dynamics_store_change_nothing(tmp_path: Path, command: str) -> None:
    pytest.importorskip("matplotlib")
    folder, out = tmp_path / "data", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    db = dynamics_store(folder / "run.db")
    before = snapshot(folder)
    if command == "read_runs":
        runs = cvcore.read_runs(db)
        last = runs[0]["records"][-1]
        assert {a["variable"] for a in last["arrays"]} == {"top_eigenvalues",
                                                           "residual_fractions"}
        assert len(last["arrays"][0]["data"]) == 3
    else:
        args = {"report": ["report", db], "report-json": ["report", db, "--json"],
                "plot": ["plot", db, "--out", out / "fig.png"],
                "export": ["export", db, "--csv", out / "t.csv"]}[command]
        result = cv(*args)
        assert result.exit_code == 0, result.output
    assert snapshot(folder) == before
