"""`cv export`: a record store as one flat table, CSV or Parquet, for pandas and polars."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from cvcore.cli.console import stderr

from cvcore.errors import InputError
from cvcore.files import atomic_output, check_output_path, write_text_atomic
from cvcore.imports import require
from cvcore.record.store import RecordStore

COLUMNS = ["run_id", "run_name", "step", "probe_set", "subset", "label", "variable", "value",
           "std", "count", "loss", "seconds", "time", "extras", "index", "convention"]
#: The files SQLite keeps beside a store (an export must never replace them either).
SIDE_FILES = ("-wal", "-shm", "-journal")


def store_files(store: Path) -> list[Path]:
    """A store and the side files SQLite keeps beside it, under its name as given and its
    real path (SQLite names the side files after the real path of a symbolic link)."""
    real = Path(os.path.realpath(store))
    return [store, real] + [Path(f"{base}{side}") for base in (store, real)
                            for side in SIDE_FILES]


def check_outputs(stores: list[Path], outputs: dict[str, Path], *, force: bool) -> None:
    """Refuse, before anything is read, outputs that would replace an input (a store or
    its side files), two outputs at one path, and any path :func:`check_output_path`
    refuses (a directory, a missing or read-only folder, an existing file without
    ``force``)."""
    sources = [f for store in stores for f in store_files(store)]
    for option, path in outputs.items():
        check_output_path(path, what=f"{option} file", force=force, sources=sources)
    seen: dict[str, str] = {}
    for option, path in outputs.items():
        key = os.path.realpath(path)
        if key in seen:
            raise InputError(f"expected different paths for {seen[key]} and {option}, got "
                             f"{path} for both")
        seen[key] = option


def export(
    store: Annotated[Path, typer.Argument(help="A record store (.db).")],
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write a CSV table here.")] = None,
    parquet: Annotated[Path | None, typer.Option(help="Write a Parquet table here (needs pyarrow).")] = None,
    run: Annotated[str | None, typer.Option(help="Only this run (id or name).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing output files.")] = False,
) -> None:
    """One row per recorded number: run, step, probe set, subset or class, variable, value, std, loss, seconds."""
    outputs = {name: path for name, path in (("--csv", csv_out), ("--parquet", parquet))
               if path is not None}
    if not outputs:
        raise InputError("expected --csv FILE or --parquet FILE, got neither")
    check_outputs([store], outputs, force=force)
    if parquet is not None:
        _pyarrow()  # before anything is read or written
    with RecordStore(store, create=False) as db:
        rows = db.rows(run, arrays=True)  # an array: one row per element, at its index
    if csv_out is not None:
        write_text_atomic(csv_out, csv_text(rows))
        stderr().print(f"wrote {len(rows)} rows to {csv_out}", markup=False)
    if parquet is not None:
        write_parquet(parquet, rows)
        stderr().print(f"wrote {len(rows)} rows to {parquet}", markup=False)


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The rows of :meth:`RecordStore.rows` as CSV text (NULL as an empty cell)."""
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
    """The rows as a Parquet table, written atomically."""
    pa = _pyarrow()
    types = {"run_id": pa.int64(), "run_name": pa.string(), "step": pa.int64(),
             "probe_set": pa.string(), "subset": pa.int64(), "label": pa.string(),
             "variable": pa.string(), "value": pa.float64(), "std": pa.float64(),
             "count": pa.int64(), "loss": pa.float64(), "seconds": pa.float64(),
             "time": pa.float64(), "extras": pa.string(), "index": pa.int64(),
             "convention": pa.string()}
    table = pa.table({c: pa.array([r[c] for r in rows], type=types[c]) for c in COLUMNS})
    with atomic_output(path) as tmp:
        pa.parquet.write_table(table, str(tmp))
