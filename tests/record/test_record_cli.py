"""`cv report`, `cv plot`, `cv export` and `cv measure --out` on record stores, with the
numbers checked against hand-derived values."""

from __future__ import annotations

import csv
import json
import math
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from cvcore.cli.app import make_app
from typer.testing import CliRunner

from cvcore.record import Record, RecordStore, Value

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(make_app(), [str(a) for a in args])


def write_run(store: RecordStore, name: str, entropy, trace, *, std=None, count=1,
              loss=None, probe_set="train") -> int:
    run_id = store.create_run(name=name, source="recorder", kernel="traced", dtype="float32",
                              cvcore_version="test", probe_sets={probe_set: {"n_samples": 8}})
    for i, (s, t) in enumerate(zip(entropy, trace)):
        sd = None if std is None else std[i]
        values = (Value(probe_set, "entropy", s, std=sd, count=count),
                  Value(probe_set, "trace", t, std=None if std is None else 1.0, count=count))
        store.add_record(run_id, Record(step=10 * i, values=values,
                                        loss=None if loss is None else loss[i],
                                        seconds=0.5, time=0.0))
    store.close_run(run_id)
    return run_id


@pytest.fixture
def two_runs(tmp_path: Path) -> Path:
    path = tmp_path / "runs.db"
    with RecordStore(path) as store:
        write_run(store, "subsets", [2.0, 1.5, 1.6, 1.7], [10.0, 20.0, 40.0, 80.0],
                  std=[0.2, 0.2, 0.2, 0.4], count=4, loss=[2.0, 1.0, 0.5, 0.25])
        write_run(store, "scatter", [1.0, 1.3, 1.4, 1.8, 1.7, 2.1], [5.0] * 6,
                  loss=[1.0, 0.8, 0.6, 0.5, 0.4, 0.3], probe_set="test")
    return path


def test_report_json_against_hand_values(two_runs: Path) -> None:
    result = invoke("report", two_runs, "--json")
    assert result.exit_code == 0, result.output
    sub, sca = json.loads(result.stdout)
    ent = sub["probe_sets"][0]["variables"]["entropy"]
    assert ent["start"] == 2.0 and ent["end"] == 1.7
    assert ent["change"] == pytest.approx(-0.3)
    assert ent["change_se"] == pytest.approx(math.hypot(0.2 / 2, 0.4 / 2))  # std / sqrt(K)
    assert ent["uncertainty"] == "4 subsets"
    assert ent["min"] == 1.5 and ent["min_step"] == 10
    assert sub["probe_sets"][0]["regime"] == "within noise"  # 0.3 < 2 × 0.2236
    tr = sub["probe_sets"][0]["variables"]["trace"]
    assert tr["growth_factor"] == pytest.approx(8.0) and tr["log_change"] == pytest.approx(
        math.log(8.0))
    assert sub["cost_seconds"]["total"] == 2.0 and sub["records"] == 4
    assert sub["loss"] == {"start": 2.0, "end": 0.25} and sub["steps"] == [0, 30]
    ent2 = sca["probe_sets"][0]["variables"]["entropy"]
    assert sca["probe_sets"][0]["probe_set"] == "test"
    assert ent2["change"] == pytest.approx(1.1)
    # no subsets, no seeds: the step-to-step scatter is not an uncertainty
    assert ent2["change_se"] is None and ent2["uncertainty"] is None
    assert sca["probe_sets"][0]["regime"] == "undetermined"
    assert sca["probe_sets"][0]["regime_sigmas"] is None


def test_report_table(two_runs: Path) -> None:
    result = invoke("report", two_runs, "--run", "subsets")
    assert result.exit_code == 0, result.output
    assert "within noise" in result.stdout and "× 8" in result.stdout
    assert "-0.3 ± 0.223607" in result.stdout and "scatter" not in result.stdout


def read_png(path: Path) -> np.ndarray:
    import matplotlib.image

    return np.asarray(matplotlib.image.imread(path))


@pytest.mark.parametrize("phase", [False, True])
def test_plot_writes_a_figure(two_runs: Path, tmp_path: Path, phase: bool) -> None:
    pytest.importorskip("matplotlib")
    other = tmp_path / "other.db"
    with RecordStore(other) as store:
        write_run(store, "third", [1.0, 0.8, 0.7], [3.0, 4.0, 5.0], loss=[1.0, 0.5, 0.2])
    out = tmp_path / "fig.png"
    result = invoke("plot", two_runs, other, "--out", out, *(["--phase"] if phase else []))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # messages on stderr only
    img = read_png(out)
    assert img.shape[0] > 300 and img.shape[1] > (900 if phase else 1400)
    assert img[..., :3].std() > 0.05  # not blank
    coloured = np.abs(img[..., 0] - img[..., 2]) > 0.3  # lines in colour, not only black/grey
    assert coloured.mean() > 0.001
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fig")] == []


def test_plot_without_matplotlib_gives_the_install_line(two_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke("plot", two_runs, "--out", tmp_path / "f.png")
    assert result.exit_code == 2
    assert "pip install 'cvcore[plot]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "f.png").exists()


def test_export_csv_and_parquet(two_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "all.csv"
    result = invoke("export", two_runs, "--csv", out)
    assert result.exit_code == 0, result.output
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 4 + 2 * 6  # two variables per record
    first = rows[0]
    assert (first["run_name"], first["step"], first["probe_set"], first["variable"],
            float(first["value"]), float(first["std"]), first["count"], float(first["loss"])
            ) == ("subsets", "0", "train", "entropy", 2.0, 0.2, "4", 2.0)
    pq = pytest.importorskip("pyarrow.parquet")
    target = tmp_path / "one.parquet"
    assert invoke("export", two_runs, "--parquet", target, "--run", "scatter").exit_code == 0
    table = pq.read_table(target).to_pylist()
    assert len(table) == 12 and {r["run_name"] for r in table} == {"scatter"}
    assert [r["value"] for r in table if r["variable"] == "entropy"] == [1.0, 1.3, 1.4, 1.8,
                                                                        1.7, 2.1]


def test_export_parquet_without_pyarrow(two_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    result = invoke("export", two_runs, "--parquet", tmp_path / "x.parquet", "--csv",
                    tmp_path / "x.csv")
    assert result.exit_code == 2 and "pip install 'cvcore[parquet]'" in result.stderr
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.parquet").exists()


@pytest.mark.parametrize("setup, args, message", [
    ("junk", ["report", "{db}"], "not one"),
    ("newer", ["report", "{db}"], "schema version 2 or older, got version 7"),
    ("missing", ["plot", "{db}", "--out", "{dir}/f.png"], "no file"),
    ("good", ["plot", "{db}", "--out", "{dir}/f.jpg"], "--out ending in .png"),
    ("good", ["export", "{db}"], "--csv FILE or --parquet FILE"),
    ("good", ["report", "{db}", "--run", "nope"], "expected a run among"),
    ("sqlite", ["report", "{db}"], "without cvcore's tables"),
])
def test_bad_stores_are_one_line(tmp_path, setup, args, message):
    db = tmp_path / "s.db"
    if setup == "junk":
        db.write_bytes(b"\x00garbage" * 64)
    elif setup in ("newer", "good"):
        with RecordStore(db) as store:
            write_run(store, "r", [1.0, 2.0], [1.0, 2.0])
        if setup == "newer":
            with sqlite3.connect(db) as conn:
                conn.execute("UPDATE meta SET value='7' WHERE key='schema_version'")
    elif setup == "sqlite":
        sqlite3.connect(db).execute("CREATE TABLE x (y)")
    result = invoke(*(a.format(db=db, dir=tmp_path) for a in args))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("f.*"))


def test_measure_out_writes_the_checkpoint_series(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    for epoch in (0, 2, 10):
        with torch.no_grad():
            model[0].weight.mul_(1.5)
        torch.save(model, tmp_path / f"epoch_{epoch}.pt")
    db = tmp_path / "ckpt.db"
    result = invoke("measure", *sorted(tmp_path.glob("epoch_*.pt")), "--data", "digits",
                    "--samples", "20", "--out", db, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    store = RecordStore(db, create=False)
    (info,) = store.runs()
    assert info.source == "checkpoints" and info.closed is not None
    assert info.probe_sets["probe"]["n_samples"] == 20
    records = store.records()
    assert [r.step for r in records] == [0, 2, 10]
    for rec, row in zip(records, rows):
        assert rec.get("entropy") == row["entropy"] and rec.get("trace") == row["trace"]
        assert rec.extras["source"] == row["source"]
    bad = invoke("measure", tmp_path / "epoch_0.pt", "--data", "nodata", "--out",
                 tmp_path / "none.db")
    assert bad.exit_code == 2 and not (tmp_path / "none.db").exists()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"junk" * 100)
    refused = invoke("measure", tmp_path / "epoch_0.pt", "--data", "digits", "--out", junk)
    assert refused.exit_code == 2 and "not one" in refused.stderr
    report = json.loads(invoke("report", db, "--json").stdout)[0]
    assert report["probe_sets"][0]["variables"]["trace"]["growth_factor"] == pytest.approx(
        rows[-1]["trace"] / rows[0]["trace"])


def test_export_carries_arrays_and_conventions(tmp_path: Path) -> None:
    """Arrays (top eigenvalues) reach the CSV and Parquet one row per element, at their
    index, with each value's convention; scalars have an empty index."""
    from cvcore.record import ArrayValue

    path = tmp_path / "dyn.db"
    eig = (5.0, 2.5, 0.25)
    with RecordStore(path) as store:
        run_id = store.create_run(name="dyn", source="recorder", kernel="traced",
                                  dtype="float64", cvcore_version="test",
                                  probe_sets={"train": {"n_samples": 3}})
        store.add_record(run_id, Record(
            step=0, values=(Value("train", "kernel_distance_init", 0.0, convention="cos"),),
            arrays=(ArrayValue("train", "top_eigenvalues", eig, convention="descending"),)))
        store.close_run(run_id)
    out = tmp_path / "dyn.csv"
    assert invoke("export", path, "--csv", out).exit_code == 0
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    scalar = [r for r in rows if r["variable"] == "kernel_distance_init"]
    assert [(r["index"], r["convention"], float(r["value"])) for r in scalar] == [
        ("", "cos", 0.0)]
    arr = [r for r in rows if r["variable"] == "top_eigenvalues"]
    assert [(int(r["index"]), float(r["value"]), r["convention"]) for r in arr] == [
        (i, v, "descending") for i, v in enumerate(eig)]
    pq = pytest.importorskip("pyarrow.parquet")
    target = tmp_path / "dyn.parquet"
    assert invoke("export", path, "--parquet", target).exit_code == 0
    table = pq.read_table(target).to_pylist()
    assert [(r["index"], r["value"]) for r in table if r["variable"] == "top_eigenvalues"] == [
        (i, v) for i, v in enumerate(eig)]


def test_plot_keeps_an_existing_figure_without_force(two_runs: Path, tmp_path: Path) -> None:
    """A file at --out stays byte for byte unless --force (then it is the new figure)."""
    pytest.importorskip("matplotlib")
    fig = tmp_path / "fig.png"
    fig.write_bytes(b"keep")
    result = invoke("plot", two_runs, "--out", fig)
    assert result.exit_code == 2 and "pass --force" in result.stderr
    assert fig.read_bytes() == b"keep"
    assert invoke("plot", two_runs, "--out", fig, "--force").exit_code == 0
    assert read_png(fig).shape[0] > 100
