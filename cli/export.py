"""`cv export`: a record store as one flat table, CSV or Parquet, for pandas and polars."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from cvcore.cli.output import stderr

from cvcore.errors import InputError
from cvcore.imports import require
from cvcore.record.store import RecordStore
from cvcore.report import write_atomic

COLUMNS = ["run_id", "run_name", "step", "probe_set", "subset", "label", "variable", "value",
           "std", "count", "loss", "seconds", "time", "extras"]


def export(
    store: Annotated[Path, typer.Argument(help="A record store (.db).")],
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write a CSV table here.")] = None,
    parquet: Annotated[Path | None, typer.Option(help="Write a Parquet table here (needs pyarrow).")] = None,
    run: Annotated[str | None, typer.Option(help="Only this run (id or name).")] = None,
) -> None:
    """One row per recorded number: run, step, probe set, subset or class, variable, value, std, loss, seconds."""
    if csv_out is None and parquet is None:
        raise InputError("expected --csv FILE or --parquet FILE, got neither")
    if parquet is not None:
        _pyarrow()  # before anything is read or written
    with RecordStore(store, create=False) as db:
        rows = db.rows(run)
    if csv_out is not None:
        write_atomic(csv_out, csv_text(rows))
        stderr().print(f"wrote {len(rows)} rows to {csv_out}", markup=False)
    if parquet is not None:
        write_parquet(parquet, rows)
        stderr().print(f"wrote {len(rows)} rows to {parquet}", markup=False)


def csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    return buf.getvalue()


def _pyarrow() -> Any:
    pyarrow = require("pyarrow", "parquet")
    require("pyarrow.parquet", "parquet", name="pyarrow")
    return pyarrow


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    pa = _pyarrow()
    types = {"run_id": pa.int64(), "run_name": pa.string(), "step": pa.int64(),
             "probe_set": pa.string(), "subset": pa.int64(), "label": pa.string(),
             "variable": pa.string(), "value": pa.float64(), "std": pa.float64(),
             "count": pa.int64(), "loss": pa.float64(), "seconds": pa.float64(),
             "time": pa.float64(), "extras": pa.string()}
    table = pa.table({c: pa.array([r[c] for r in rows], type=types[c]) for c in COLUMNS})
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp",
                               dir=Path(path).parent if str(Path(path).parent) else ".")
    os.close(fd)
    try:
        pa.parquet.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
