"""cv sweep under misuse: unique cell ids, a locked and never-adopted directory, Ctrl-C
and a killed parent, bounds checked before starting, one line for every mistake."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from cvcore.cli.app import make_app
from typer.testing import CliRunner

from cvcore.record import RecordStore
from cvcore.sweep import ConfigError, parse_config, run_sweep
from cvcore.sweep.cell import run_cell
from cvcore.sweep.config import SweepConfig, cell_id

#: One width, one seed, one epoch: a cell of a second or so.
ONE = """
name = "one"
[model]
family = "dense"
depth = 1
activation = "tanh"
[grid]
width = [3]
seed = [0]
[data]
dataset = "digits"
train = 120
test = 40
[train]
epochs = 1
batch_size = 40
lr = 0.01
[probe]
train = 8
test = 8
[record]
every = 1
"""

#: Cells slow enough (tens of seconds each) to still be running when a signal arrives.
SLOW = ONE.replace("width = [3]", "width = [16, 17]").replace("seed = [0]", "seed = [0, 1]") \
    .replace("epochs = 1", "epochs = 20000").replace("every = 1", "every = 10000")


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def cv(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(make_app(), list(args))
    return res.exit_code, res.output


def one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert "Traceback" not in output
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@pytest.fixture
def no_cells_run(monkeypatch):
    """Fail the test if any cell starts (and never spend a cell's time)."""
    calls: list[str] = []

    def refuse(config, cell, sweep_dir):
        calls.append(cell.id)
        raise AssertionError(f"cell {cell.id} started")

    from cvcore.sweep import engines

    monkeypatch.setattr(engines, "run_cell", refuse)
    return calls


# -- 1. cell ids ------------------------------------------------------------------------

def test_grid_values_that_print_alike_get_their_own_cells_and_stores(tmp_path):
    cfg = parse_config(ONE.replace("seed = [0]", "seed = [0]\nlr = [0.001, 0.0010000001]"))
    ids = [c.id for c in cfg.cells()]
    assert ids == ["width=3,seed=0,lr=0.001", "width=3,seed=0,lr=0.0010000001"]
    lines: list[str] = []
    summary = run_sweep(cfg, tmp_path / "s", workers=1, progress=lines.append)
    assert (summary["done"], summary["failed"]) == (2, 0)
    stores = sorted((tmp_path / "s" / "cells").glob("*.db"))
    assert [p.name for p in stores] == [f"{i}.db" for i in sorted(ids)]
    for store in stores:  # one run per store: cv scaling reads each
        with RecordStore(store, create=False) as s:
            assert len(s.runs()) == 1
    assert "estimated ~" in lines[0]  # the cost is stated before the sweep starts


@pytest.mark.parametrize(("grid", "message"), [
    ("lr = [1, 1.0]", ("[grid] lr: expected distinct values (each one names the cell's files), "
                      "got 1 and 1.0, which both read '1'")),
    ("momentum = [0, 0.0]", "[grid] momentum: expected distinct values"),
    ("tag = ['a b', 'a_b']", ("[grid] tag: expected distinct values (each one names the cell's "
                             "files), got 'a b' and 'a_b', which both read 'a_b'")),
    ("'a b' = [1]\na_b = [2]", "expected axis names that differ in the cell ids"),
])
def test_grid_values_that_cannot_be_told_apart_are_refused_in_one_line(grid, message):
    text = ONE.replace("seed = [0]", f"seed = [0]\n{grid}")
    if "lr" not in grid and "momentum" not in grid:  # free axes: a user's factory
        text = text.replace('family = "dense"\ndepth = 1\nactivation = "tanh"',
                            'family = "tests.sweep_factories:make"')
    with pytest.raises(ConfigError) as info:
        parse_config(text, where="c.toml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cell_ids_are_the_same_on_every_run_and_fit_a_file_name():
    assert cell_id({"width": 4, "lr": 1e-3, "seed": 0}) == "width=4,lr=0.001,seed=0"
    assert cell_id({"lr": 1e-5, "m": 0.9, "bias": True}) == "lr=1e-05,m=0.9,bias=True"
    assert cell_id({"lr": 0.1 + 0.2}) == "lr=0.30000000000000004"
    assert cell_id({"shape": [1, 8, 8], "name": "../x,y=1"}) == "shape=1x8x8,name=.._x_y_1"
    long = {f"axis{i}": "v" * 40 for i in range(10)}
    first, again = cell_id(long), cell_id(dict(long))
    assert first == again and len(first) <= 200
    assert first != cell_id({**long, "axis9": "v" * 39 + "w"})  # the hash sees the whole id


# -- 2. the sweep directory -------------------------------------------------------------

def test_a_sweep_does_not_adopt_a_folder_of_other_files(tmp_path):
    out = tmp_path / "mine"
    (out / "cells").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    (out / "sweep.json").write_text('{"mine": true}')
    (out / "cells" / "width=3,seed=0.db").write_bytes(b"my own database")
    before = snapshot(out)
    code, output = cv("sweep", str(write(tmp_path, ONE)), "--out", str(out), "--workers", "1")
    assert code == 2
    assert "expected an empty folder or a sweep directory (with sweep.toml)" in \
        one_line_error(output)
    assert snapshot(out) == before


def test_a_store_the_sweep_did_not_write_is_never_deleted(tmp_path):
    cfg = parse_config(ONE)
    cell = cfg.cells()[0]
    (tmp_path / "cells").mkdir()
    foreign = tmp_path / "cells" / f"{cell.id}.db"
    foreign.write_bytes(b"not the sweep's")
    (tmp_path / "cells" / f"{cell.id}.db-wal").write_bytes(b"nor this")
    status = run_cell(cfg, cell, tmp_path)
    assert status["status"] == "failed"
    assert "this sweep did not write it and will not delete it" in status["error"]
    assert foreign.read_bytes() == b"not the sweep's"
    assert (tmp_path / "cells" / f"{cell.id}.db-wal").read_bytes() == b"nor this"
    assert not (tmp_path / "cells" / f"{cell.id}.json").exists()  # a rerun still keeps it


def test_a_cell_left_unfinished_by_the_sweep_starts_afresh(tmp_path):
    cfg = parse_config(ONE)
    cell = cfg.cells()[0]
    assert run_cell(cfg, cell, tmp_path)["status"] == "done"
    status_file = tmp_path / "cells" / f"{cell.id}.json"
    status_file.write_text(json.dumps({"status": "running", "id": cell.id}))
    (tmp_path / "cells" / f"{cell.id}.db-journal").write_bytes(b"left by a killed cell")
    assert run_cell(cfg, cell, tmp_path)["status"] == "done"
    assert not (tmp_path / "cells" / f"{cell.id}.db-journal").exists()
    with RecordStore(tmp_path / "cells" / f"{cell.id}.db", create=False) as s:
        assert len(s.runs()) == 1


@pytest.mark.parametrize("name", ["/tmp/cv-sweep-escape", "../escape", "a/b", "..", ".",
                                  "a\\\\b", " padded"])
def test_a_config_name_cannot_place_the_sweep_outside_runs(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, f'name = "{name}"\n' + ONE.replace('name = "one"\n', ""))
    code, output = cv("sweep", str(path), "--workers", "1")
    assert code == 2
    assert "name: expected a plain folder name" in one_line_error(output)
    assert not Path("/tmp/cv-sweep-escape").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


# -- 4. bounds before starting ----------------------------------------------------------

def test_a_huge_grid_is_counted_not_expanded_and_refused(tmp_path, monkeypatch, no_cells_run):
    def expanded(self):
        raise AssertionError("the grid was expanded")

    monkeypatch.setattr(SweepConfig, "cells", expanded)
    axes = "\n".join(f"lr{i} = [{', '.join(str(0.01 + j / 1e4) for j in range(100))}]"
                     for i in range(6))
    text = ONE.replace('family = "dense"\ndepth = 1\nactivation = "tanh"',
                       'family = "tests.sweep_factories:make"').replace("seed = [0]",
                                                                        "seed = [0]\n" + axes)
    started = time.perf_counter()
    code, output = cv("sweep", str(write(tmp_path, text)), "--out", str(tmp_path / "o"),
                      "--allow-large")
    assert code == 2
    assert "expected at most 100,000 cells (each has its own files), got " \
           "1,000,000,000,000" in one_line_error(output)
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "o").exists()


def test_a_large_grid_needs_allow_large(tmp_path, no_cells_run):
    text = ONE.replace("seed = [0]", f"seed = {list(range(20000))}")
    code, output = cv("sweep", str(write(tmp_path, text)), "--out", str(tmp_path / "o"))
    assert code == 2
    assert "expected at most 10,000 cells without --allow-large, got 20,000" in \
        one_line_error(output)
    assert not (tmp_path / "o").exists() and not no_cells_run


def test_a_long_sweep_states_its_estimate_and_needs_allow_large(tmp_path, no_cells_run):
    text = ONE.replace("width = [3]", "width = [300, 1000]").replace("depth = 1", "depth = 4") \
        .replace("epochs = 1", "epochs = 50000")
    code, output = cv("sweep", str(write(tmp_path, text)), "--out", str(tmp_path / "o"))
    assert code == 2
    line = one_line_error(output)
    assert "expected a sweep estimated at most 60.0min without --allow-large, got 2 cells " \
           "estimated at ~" in line and "on 2 workers" in line
    assert not (tmp_path / "o").exists() and not no_cells_run


@pytest.mark.parametrize(("change", "message"), [
    ("epochs = 1000000000", "[train] epochs: expected at most 100,000, got 1000000000"),
    ("lr = nan", "[train] lr: expected a positive number, finite, got nan"),
    ("lr = inf", "[train] lr: expected a positive number, finite, got inf"),
    ("momentum = inf", "[train] momentum: expected a number >= 0, finite, got inf"),
    ("weight_decay = nan", "[train] weight_decay: expected a number >= 0, finite, got nan"),
])
def test_training_values_are_bounded(change, message):
    key = change.split(" = ")[0]
    text = "\n".join(line for line in ONE.splitlines() if not line.startswith(f"{key} ="))
    text = text.replace("[train]\n", f"[train]\n{change}\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text, where="c.toml")
    assert message in str(info.value)


@pytest.mark.parametrize(("grid", "message"), [
    ("width = [10000000]", "width: expected at most 100,000, got 10,000,000"),
    ("depth = [5000]", "depth: expected at most 1,000, got 5,000"),
    ("lr = [0.1, nan]", "[train] lr: expected a positive number, finite, got nan"),
])
def test_grid_values_are_bounded(grid, message):
    key = grid.split(" = ")[0]
    text = ONE.replace(f"{key} = 1\n", "").replace("width = [3]", "" if key == "width" else
                                                   "width = [3]").replace("seed = [0]",
                                                                          f"seed = [0]\n{grid}")
    with pytest.raises(ConfigError) as info:
        parse_config(text, where="c.toml")
    assert message in str(info.value)


@pytest.mark.parametrize(("change", "message"), [
    (("train = 8\ntest = 8", "train = 500\ntest = 8"),
     "[probe] train: expected at most the 120 training samples, got 500"),
    (("train = 8\ntest = 8", "train = 8\ntest = 41"),
     "[probe] test: expected at most the 40 test samples, got 41"),
    (("train = 120\ntest = 40", "train = 5000"),
     "[data] train: expected fewer than the 1797 samples of 'digits'"),
    (("train = 8\ntest = 8", "train = 8\ntest = 8\nsubsets = [2, 9]"),
     "[probe] subsets: expected subsets of at most 8 samples"),
])
def test_sizes_against_the_data_are_checked_before_starting(tmp_path, no_cells_run, change,
                                                           message):
    code, output = cv("sweep", str(write(tmp_path, ONE.replace(*change))), "--out",
                      str(tmp_path / "o"))
    assert code == 2
    assert message in one_line_error(output)
    assert not (tmp_path / "o").exists() and not no_cells_run


def test_a_cell_too_large_for_memory_is_refused_even_with_allow_large(tmp_path, no_cells_run):
    text = ONE.replace("width = [3]", "width = [100000]").replace("depth = 1", "depth = 3")
    code, output = cv("sweep", str(write(tmp_path, text)), "--out", str(tmp_path / "o"),
                      "--allow-large")
    assert code == 2
    assert "cell width=100000,seed=0: expected at most 200,000,000 parameters per cell, got " \
           "about 20,007," in one_line_error(output)
    assert not (tmp_path / "o").exists() and not no_cells_run


# -- 5. one line for every mistake ------------------------------------------------------

def test_out_that_is_a_file_or_under_a_file_is_one_line(tmp_path):
    config = str(write(tmp_path, ONE))
    (tmp_path / "file").write_bytes(b"keep me")
    for out, message in ((tmp_path / "file", ("expected a folder for the sweep (--out), got a "
                                             "file")),
                         (tmp_path / "file" / "sub", "to be a folder to create the sweep in")):
        code, output = cv("sweep", config, "--out", str(out), "--workers", "1")
        assert code == 2
        assert message in one_line_error(output)
    assert (tmp_path / "file").read_bytes() == b"keep me"


def test_out_in_a_read_only_folder_is_one_line(tmp_path, monkeypatch):
    from cvcore.sweep import directory

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    # root writes through a read-only mode, so the check is made to see what a user sees
    monkeypatch.setattr(directory.os, "access",
                        lambda p, mode: False if Path(p) == ro else real(p, mode))
    if os.geteuid() != 0:
        ro.chmod(0o555)
    try:
        code, output = cv("sweep", str(write(tmp_path, ONE)), "--out", str(ro / "a" / "b"))
    finally:
        ro.chmod(0o755)
    assert code == 2
    assert f"expected a writable folder to create the sweep in (--out), got a read-only {ro}" \
        in one_line_error(output)
    assert list(ro.iterdir()) == []


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(ONE.replace('"one"', '"caf\xe9"').encode("latin-1"))
    code, output = cv("sweep", str(path), "--out", str(tmp_path / "o"))
    assert code == 2
    assert "expected a UTF-8 TOML file, got a byte 0xe9 that is not UTF-8" in \
        one_line_error(output)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("options", [["--order", "bogus"], ["--workers", "0"],
                                     ["--engine", "dask", "--scheduler", "nowhere"],
                                     ["--engine", "ray"]])
def test_options_are_checked_before_anything_is_created(tmp_path, options):
    code, output = cv("sweep", str(write(tmp_path, ONE)), "--out", str(tmp_path / "o"),
                      *options)
    assert code == 2
    one_line_error(output)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("corrupt", [b'{"status": "do', b"[1, 2]", b"\xff\xfe", b'"done"'])
def test_a_malformed_status_file_means_not_done_and_is_said(tmp_path, corrupt):
    config = str(write(tmp_path, ONE))
    out = tmp_path / "o"
    assert cv("sweep", config, "--out", str(out), "--workers", "1")[0] == 0
    status = out / "cells" / "width=3,seed=0.json"
    status.write_bytes(corrupt)
    code, output = cv("sweep", config, "--out", str(out), "--workers", "1")
    assert code == 0, output
    assert f"cell width=3,seed=0: its status file {status} is " in output
    assert "running it again" in output and "0 already done, 1 to run" in output
    assert json.loads(status.read_text())["status"] == "done"


@pytest.mark.slow
def test_a_worker_that_dies_fails_its_cell_and_the_others_go_on(tmp_path):
    text = ONE.replace('family = "dense"\ndepth = 1\nactivation = "tanh"',
                       'family = "tests.sweep_factories:make"').replace(
        "width = [3]", "width = [14, 3, 4]")  # width 14 kills its worker process
    out = tmp_path / "o"
    code, output = cv("sweep", str(write(tmp_path, text)), "--out", str(out), "--workers", "2",
                      "--order", "grid")
    assert code == 1, output
    assert "FAILED width=14,seed=0 (0.0s): WorkerDied: the worker process running it died " \
           "(exit code -9" in output
    statuses = {p.stem: json.loads(p.read_text())["status"] for p in (out / "cells").glob(
        "*.json")}
    assert statuses == {"width=14,seed=0": "failed", "width=3,seed=0": "done",
                        "width=4,seed=0": "done"}


# -- 2, 3. a running sweep: the lock, Ctrl-C, a killed parent ----------------------------

def _start(tmp_path: Path, workers: int = 2) -> tuple[subprocess.Popen[bytes], Path]:
    out = tmp_path / "slow"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cvcore", "sweep", str(write(tmp_path, SLOW)), "--out", str(out),
         "--workers", str(workers)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    return proc, out


def _workers(parent: int) -> list[int]:
    """The pids of the spawned worker processes of ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _running(proc: subprocess.Popen[bytes], out: Path, count: int, *,
             must: bool = True) -> list[dict]:
    """The statuses of ``count`` running cells, once that many are running (with
    ``must=False``: whatever is there after 30 s)."""
    deadline = time.monotonic() + (90 if must else 30)
    found: list[dict] = []
    while time.monotonic() < deadline:
        found = []
        for path in (out / "cells").glob("*.json") if (out / "cells").is_dir() else ():
            try:
                data = json.loads(path.read_text())
            except ValueError:
                continue
            if data.get("status") == "running":
                found.append(data)
        if len(found) >= count:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended early: {proc.stderr.read().decode()}")
        time.sleep(0.2)
    if must:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"no {count} cells were marked running within 90 s")
    return found


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_second_sweep_on_a_running_directory_is_refused_naming_the_holder(tmp_path,
                                                                            no_cells_run):
    proc, out = _start(tmp_path, 1)
    try:
        _running(proc, out, 1, must=False)
        code, output = cv("sweep", str(tmp_path / "c.toml"), "--out", str(out))
        assert code == 2
        line = one_line_error(output)
        assert f"{out}: expected no other cv sweep running on this directory, got one: pid " \
               f"{proc.pid} on host " in line and ", started " in line
        assert not no_cells_run
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("workers", [2, 1])
def test_ctrl_c_stops_a_two_worker_sweep_within_seconds(tmp_path, workers):
    proc, out = _start(tmp_path, workers)
    try:
        running = _running(proc, out, workers, must=False)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole group
        started = time.monotonic()
        _, err = proc.communicate(timeout=15)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert took < 10, took
    assert proc.returncode == 130, err.decode()
    text = err.decode()
    assert "Traceback" not in text and "CSV" not in text and "rows" not in text
    assert text.strip().splitlines()[-1].startswith(
        f"interrupted: {workers} running cell{'s' if workers > 1 else ''} stopped and marked "
        f"interrupted, 0 done kept in {out}")
    statuses = {p.stem: json.loads(p.read_text())["status"]
                for p in (out / "cells").glob("*.json")}
    assert list(statuses.values()) == ["interrupted"] * workers
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["status"] == "interrupted"
    assert sorted(summary["interrupted"]) == sorted(statuses)
    assert not [s["pid"] for s in running if _alive(s["pid"])]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_killing_the_sweep_leaves_no_worker_alive(tmp_path):
    proc, out = _start(tmp_path)
    workers: list[int] = []
    try:
        _running(proc, out, 2, must=False)
        workers = _workers(proc.pid)
        assert len(workers) == 2, workers
        os.kill(proc.pid, signal.SIGKILL)
        started = time.monotonic()
        proc.communicate(timeout=10)  # its stderr closes: no worker holds it
        while any(_alive(pid) for pid in workers) and time.monotonic() - started < 10:
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in workers:  # workers that outlived the sweep: do not leave them behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    # the lock died with its holder: the directory is free for the next sweep
    from cvcore.sweep.directory import SweepLock

    lock = SweepLock(out)
    lock.acquire()
    lock.release()
