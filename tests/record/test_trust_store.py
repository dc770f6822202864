"""Record stores as untrusted input: readers change nothing on disk, exports never replace
their store, every mistake and every damaged file is one line (a CVCoreError)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cvcore.cli.app import make_app
from cvcore.cli.export import csv_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cvcore
from cvcore.errors import CVCoreError
from cvcore.record import Record, RecordStore, Value, read_runs
from cvcore.record.schema import COLUMNS
from cvcore.record.summary import summarize

runner = CliRunner()
CV = Path(sys.executable).parent / "cv"
NOBODY = 65534


def cv(*args: object):
    return runner.invoke(make_app(), [str(a) for a in args])


def one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def write_store(path: Path, *, runs: int = 2, records: int = 4) -> Path:
    """A store written the way the Recorder writes one: subsets, classes, extras, losses."""
    with RecordStore(path) as store:
        for k in range(runs):
            run = store.create_run(name=f"run{k}", source="recorder", kernel="traced",
                                   dtype="float64", cvcore_version="test",
                                   probe_sets={"train": {"n_samples": 8}, "test": {}},
                                   options={"every": 1}, tags={"width": 4 + k})
            for i in range(records):
                values = (Value("train", "entropy", 1.0 + 0.1 * i, std=0.05, count=3),
                          Value("train", "entropy", 1.1 + 0.1 * i, subset=0),
                          Value("train", "trace", 2.0 * (i + 1)),
                          Value("test", "entropy", 0.9 + 0.2 * i, label="cat"),
                          Value("test", "trace", 3.0 + i))
                store.add_record(run, Record(step=5 * i, values=values,
                                             loss=None if i == 1 else 1.0 / (i + 1),
                                             extras={"lr": 0.1, "acc": 0.5 + 0.1 * i},
                                             seconds=0.01, time=1.0))
            store.close_run(run)
    return path


def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Everything under a folder: each file's hash, mtime and mode, each link's target
    (a listing with contents)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            content = f"-> {os.readlink(p)}"
        elif p.is_dir():
            content = "<dir>"
        else:
            content = hashlib.sha256(p.read_bytes()).hexdigest()
        out[str(p.relative_to(folder))] = (content, st.st_mtime_ns, st.st_mode)
    return out


def foreign(path: Path) -> Path:
    """Another application's SQLite file (rollback journal, its own tables)."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.executemany("INSERT INTO customers (name) VALUES (?)", [("a",), ("b",)])
    conn.commit()
    conn.close()
    return path


def recorded(path: Path) -> Path:
    """A store written by a real Recorder on a small torch model, closed."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    x = np.random.default_rng(1).normal(size=(10, 4))
    with cvcore.Recorder({"train": x, "test": x[:6]}, sink=path, variables=["entropy", "trace"],
                         name="real") as rec:
        for step in range(3):
            rec.record(step, model, loss=1.0 / (step + 1))
    return path


# -- 1. cv export never replaces its store ----------------------------------------------


@pytest.mark.parametrize("target", ["same", "symlink", "hardlink", "wal", "shm", "via-link"])
def test_export_never_overwrites_its_store(tmp_path: Path, target: str) -> None:
    db = write_store(tmp_path / "run.db")
    store = db
    out = {"same": db, "wal": tmp_path / "run.db-wal", "shm": tmp_path / "run.db-shm",
           "symlink": tmp_path / "link.csv", "hardlink": tmp_path / "hard.csv",
           "via-link": db}[target]
    if target == "symlink":
        out.symlink_to(db)
    elif target == "hardlink":
        os.link(db, out)
    elif target == "via-link":  # the store given through a link, the output its real name
        store = tmp_path / "alias.db"
        store.symlink_to(db)
    before = snapshot(tmp_path)
    result = cv("export", store, "--csv", out, "--force")
    one_line_error(result, "expected the --csv file path to differ from the input")
    assert snapshot(tmp_path) == before
    assert len(read_runs(db)) == 2


def test_export_refuses_an_existing_file_without_force(tmp_path: Path) -> None:
    db = write_store(tmp_path / "run.db")
    out = tmp_path / "old.csv"
    out.write_bytes(b"precious")
    one_line_error(cv("export", db, "--csv", out), "pass --force to replace it")
    assert out.read_bytes() == b"precious"
    assert cv("export", db, "--csv", out, "--force").exit_code == 0
    with RecordStore(db, create=False) as store:
        assert out.read_text() == csv_text(store.rows())


def test_export_refuses_one_path_for_csv_and_parquet(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    db = write_store(tmp_path / "run.db")
    before = snapshot(tmp_path)
    one_line_error(cv("export", db, "--csv", tmp_path / "t", "--parquet", tmp_path / "t"),
                   "expected different paths for --csv and --parquet")
    assert snapshot(tmp_path) == before


def test_export_checks_outputs_before_reading_the_store(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite" * 100)
    (tmp_path / "out.csv").write_text("kept")
    # the output is refused first: the store (which is not one) was never opened
    one_line_error(cv("export", junk, "--csv", tmp_path / "out.csv"), "pass --force")


@pytest.mark.parametrize("command", ["export", "plot", "scaling"])
@pytest.mark.parametrize("problem", ["directory", "missing-folder", "file-as-folder"])
def test_output_path_mistakes_are_one_line(tmp_path: Path, command: str, problem: str) -> None:
    pytest.importorskip("matplotlib")
    db = write_store(tmp_path / "run.db")
    (tmp_path / "adir.png").mkdir()
    (tmp_path / "afile").write_text("x")
    out = {"directory": tmp_path / "adir.png", "missing-folder": tmp_path / "no" / "f.png",
           "file-as-folder": tmp_path / "afile" / "f.png"}[problem]
    if command == "scaling":
        sweep = write_sweep(tmp_path / "sweep")
        if problem == "directory":  # a file where the folder should be
            out = tmp_path / "afile"
        args: list[Any] = ["scaling", sweep, "--out", out, "--boot", "5", "--no-plots"]
    else:
        args = [command, db, "--csv" if command == "export" else "--out", out]
    before = snapshot(tmp_path)
    result = cv(*args)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot(tmp_path) == before


def test_plot_refuses_its_store_as_output(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    db = write_store(tmp_path / "run.db")
    os.link(db, tmp_path / "fig.png")  # the store under a figure's name
    before = snapshot(tmp_path)
    one_line_error(cv("plot", db, "--out", tmp_path / "fig.png"), "differ from the input")
    one_line_error(cv("plot", db, "--out", db), "--out ending in .png")
    assert snapshot(tmp_path) == before


# -- 2. readers change nothing on disk --------------------------------------------------


def reader_commands(db: Path, out: Path) -> dict[str, list[Any]]:
    return {"report": ["report", db], "report-json": ["report", db, "--json"],
            "plot": ["plot", db, "--out", out / "fig.png"],
            "export": ["export", db, "--csv", out / "t.csv"]}


@pytest.mark.parametrize("kind", ["foreign", "empty", "store", "recorder"])
@pytest.mark.parametrize("command", ["report", "report-json", "plot", "export", "read_runs"])
def test_readers_leave_every_byte_as_it_was(tmp_path: Path, kind: str, command: str) -> None:
    pytest.importorskip("matplotlib")
    folder, out = tmp_path / "data", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    db = folder / "run.db"
    if kind == "foreign":
        foreign(db)
    elif kind == "empty":
        db.write_bytes(b"")
    elif kind == "store":
        write_store(db)
    else:
        recorded(db)
    before = snapshot(folder)
    if command == "read_runs":
        try:
            runs = read_runs(db)
            assert kind in ("store", "recorder") and runs
        except CVCoreError:
            assert kind in ("foreign", "empty")
    else:
        result = cv(*reader_commands(db, out)[command])
        assert result.exit_code == (0 if kind in ("store", "recorder") else 2), result.output
    assert snapshot(folder) == before  # same names, same bytes, same mtimes
    if kind == "foreign":
        assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def run_as_nobody(args: list[Any], env_dir: Path) -> subprocess.CompletedProcess[str]:
    """A command as an unprivileged user (root ignores file modes, so a read-only folder or
    file only stops a process that is not root)."""
    env = {**os.environ, "MPLCONFIGDIR": str(env_dir), "HOME": str(env_dir)}
    prefix: list[Any] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot drop privileges")
        prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    return subprocess.run([str(a) for a in prefix + args], capture_output=True, text=True,
                          env=env, cwd=env_dir, timeout=120, check=False)


@pytest.mark.parametrize("locked", ["folder", "file"])
def test_read_only_store_is_read_without_writing(locked: str) -> None:
    """A store in a 0555 folder, or a 0444 store file, read by a user who cannot write
    there: the report works and no -wal / -shm file appears (checked by that user's
    failure to create one as well as by the listing)."""
    base = Path(tempfile.mkdtemp(prefix="cv-ro-"))
    try:
        os.chmod(base, 0o777)
        folder = base / "data"
        folder.mkdir()
        db = write_store(folder / "run.db")
        os.chmod(db, 0o444 if locked == "file" else 0o644)
        os.chmod(folder, 0o555 if locked == "folder" else 0o777)
        target = folder / "x" if locked == "folder" else db
        probe = run_as_nobody([sys.executable, "-c", f"open({str(target)!r}, 'a')"], base)
        assert probe.returncode != 0, f"{target} is writable by this user after all"
        before = snapshot(folder)
        result = run_as_nobody([CV, "report", db, "--json"], base)
        assert result.returncode == 0, result.stderr
        assert [r["run_name"] for r in json.loads(result.stdout)] == ["run0", "run1"]
        assert snapshot(folder) == before
    finally:
        os.chmod(base / "data", 0o755)
        shutil.rmtree(base)


def test_reader_sees_a_running_writer(tmp_path: Path) -> None:
    """cv report while a writer holds the store open: committed records are seen, the
    writer keeps writing, and WAL mode (the writer's crash safety) is kept."""
    db = tmp_path / "live.db"
    with RecordStore(db) as writer:
        run = writer.create_run(name="live", source="recorder", kernel="traced",
                                dtype="float64", cvcore_version="t", probe_sets={})
        for step in range(3):
            writer.add_record(run, Record(step, (Value("p", "entropy", 1.0 + step),)))
            result = cv("report", db, "--json")
            assert result.exit_code == 0, result.output
            assert json.loads(result.stdout)[0]["records"] == step + 1
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r.step for r in RecordStore(db, create=False).records()] == [0, 1, 2]


def test_reader_opened_before_a_writer_sees_its_records(tmp_path: Path) -> None:
    """A closed store is read as an immutable file; a writer that appends and checkpoints
    into the file while the reader is open must not make the reader return stale or torn
    rows: the reader notices the change and reads the file again."""
    db = write_store(tmp_path / "run.db", runs=1, records=2)
    reader = RecordStore(db, create=False)
    assert len(reader.records()) == 2
    with RecordStore(db) as writer:
        for step in range(200):  # enough pages that the checkpoint rewrites the file
            writer.add_record(1, Record(100 + step, tuple(
                Value("train", "entropy", float(k), subset=k) for k in range(20))))
    assert not Path(f"{db}-wal").exists()  # the writer's close checkpointed into run.db
    records = reader.records()
    assert len(records) == 202 and records[-1].step == 299
    reader.close()


def test_a_store_opened_for_reading_can_still_be_written(tmp_path: Path) -> None:
    """RecordStore(path, create=False) reads without writing; its first write (what
    cv measure --out does to an existing store) opens it again for writing."""
    db = write_store(tmp_path / "run.db", runs=1, records=1)
    store = RecordStore(db, create=False)
    assert store.readonly
    store.add_record(1, Record(7, (Value("train", "trace", 1.0),)))
    assert not store.readonly and [r.step for r in store.records()][-1] == 7
    store.close()


def test_a_writer_refuses_a_foreign_file_without_changing_it(tmp_path: Path) -> None:
    db = foreign(tmp_path / "other.db")
    before = snapshot(tmp_path)
    with pytest.raises(CVCoreError, match="without cvcore's tables"):
        RecordStore(db)
    assert snapshot(tmp_path) == before


# -- 3. damaged stores: one line, never another exception, never a changed byte ---------


@functools.lru_cache(maxsize=1)
def pristine() -> bytes:
    """The bytes of a small real store, the fuzz's starting point."""
    with tempfile.TemporaryDirectory() as d:
        return write_store(Path(d) / "s.db", runs=2, records=3).read_bytes()


def read_everything(db: Path, out: Path) -> None:
    """What the readers do: read_runs, the report's numbers, the export's rows, the CLI."""
    read_runs(db)
    with RecordStore(db, create=False) as store:
        summarize(store)
        csv_text(store.rows())
    for args in (["report", db], ["report", db, "--json"], ["export", db, "--csv",
                                                             out / "t.csv", "--force"]):
        result = cv(*args)
        if result.exit_code != 0:
            assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (
                args, result.exception, result.output)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=64)),
)


def mutate(data: bytes, edits: list[tuple[str, int, Any]]) -> bytes:
    buf = bytearray(data)
    for kind, where, what in edits:
        if not buf:
            break
        at = where % len(buf)
        if kind == "flip":
            buf[at] ^= what
        elif kind == "truncate":
            del buf[at:]
        else:
            buf[at:at + len(what)] = what
    return bytes(buf)


def read_and_check_unchanged(db: Path, out: Path) -> None:
    """Every reader on ``db``: a result or a CVCoreError, and its folder byte for byte as before."""
    before = snapshot(db.parent)
    try:
        read_everything(db, out)
    except CVCoreError:
        pass
    assert snapshot(db.parent) == before


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(mutation, min_size=1, max_size=4))
def test_damaged_stores_are_one_line_errors(edits) -> None:
    data = mutate(pristine(), edits)
    with tempfile.TemporaryDirectory() as d:
        folder, out = Path(d) / "data", Path(d) / "out"
        folder.mkdir()
        out.mkdir()
        db = folder / "s.db"
        db.write_bytes(data)
        read_and_check_unchanged(db, out)


ODD_VALUES = [None, 0, -1, 2**63 - 1, -(2**63), 1e308, math.inf, -math.inf, "", "x", "{}", "[]",
              "null", '{"a": NaN}', "1", "train", "entropy", b"\xff\x00", "[" * 3000, 3.5]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.lists(st.tuples(st.sampled_from(sorted(COLUMNS)), st.data()), min_size=1,
                      max_size=3))
def test_values_of_the_wrong_type_are_one_line_errors(edits) -> None:
    """A valid SQLite file whose cells hold what the schema does not allow (SQLite is
    dynamically typed): every reader gives a result or a CVCoreError."""
    with tempfile.TemporaryDirectory() as d:
        folder, out = Path(d) / "data", Path(d) / "out"
        folder.mkdir()
        out.mkdir()
        db = folder / "s.db"
        db.write_bytes(pristine())
        conn = sqlite3.connect(db)
        for table, data in edits:
            column = data.draw(st.sampled_from(COLUMNS[table]))
            value = data.draw(st.sampled_from(ODD_VALUES))
            with contextlib.suppress(sqlite3.IntegrityError):  # a NOT NULL or unique key
                conn.execute(f"UPDATE {table} SET {column}=? WHERE rowid IN (SELECT rowid "
                             f"FROM {table} ORDER BY rowid DESC LIMIT 1)", (value,))
        conn.commit()
        conn.close()
        read_and_check_unchanged(db, out)


def test_damaged_values_name_the_table_and_column(tmp_path: Path) -> None:
    db = write_store(tmp_path / "run.db", runs=1, records=2)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE records SET step='ten' WHERE id=2")
        conn.execute("UPDATE runs SET tags='[1, 2]'")
    one_line_error(cv("report", db), "runs row 1, column tags: expected a JSON object")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET tags='{}'")
        conn.execute("UPDATE meta SET value='1x' WHERE key='schema_version'")
    one_line_error(cv("report", db), "schema_version is '1x', not an integer")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    one_line_error(cv("export", db, "--csv", tmp_path / "t.csv"),
                   "column step: expected an integer, got 'ten'")
    assert not (tmp_path / "t.csv").exists()


# -- 4. empty stores and unknown probe sets ---------------------------------------------


def test_report_on_an_empty_store_says_so(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    RecordStore(db).close()
    result = cv("report", db)
    assert result.exit_code == 0 and result.stdout.strip() == f"{db}: no records yet"
    result = cv("report", db, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    assert result.stderr.strip() == f"{db}: no records yet"


def test_report_and_plot_with_several_runs_one_without_records(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    db = write_store(tmp_path / "run.db", runs=2, records=3)
    with RecordStore(db) as store:
        store.create_run(name="fresh", source="recorder", kernel="traced", dtype="float64",
                         cvcore_version="t", probe_sets={})
    result = cv("report", db)
    assert result.exit_code == 0, result.output
    assert "run 3 'fresh': no records yet" in result.stdout
    assert "run 1 'run0'" in result.stdout and "run 2 'run1'" in result.stdout
    result = cv("plot", db, "--out", tmp_path / "f.png")
    assert result.exit_code == 0 and (tmp_path / "f.png").stat().st_size > 1000
    assert "(3 runs, 6 records)" in " ".join(result.stderr.split())
    one_line_error(cv("plot", db, "--run", "fresh", "--out", tmp_path / "g.png"),
                   "holds no records yet")


def write_sweep(root: Path) -> Path:
    from tests.sweep.test_scaling import write_sweep as hand_sweep

    return hand_sweep(root, lambda p, d, a: math.log10(p) - 3, seeds=(0,), noise=(0.0,))


def test_scaling_refuses_an_unknown_probe_set(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path / "sweep")
    result = cv("scaling", sweep, "--probe", "nope", "--no-plots", "--boot", "5")
    one_line_error(result, "expected --probe among the probe sets the sweep recorded "
                           "['train'], got 'nope'")
    assert not (sweep / "scaling").exists()
    assert cv("scaling", sweep, "--probe", "train", "--no-plots", "--boot", "5").exit_code == 0
