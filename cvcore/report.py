"""Rows of results: one per measured input, with where the number came from."""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cvcore.spectrum import CollectiveVariables, DiagonalVariables, collective_variables

VARIABLES = [f.name for f in fields(CollectiveVariables)]
META = ["source", "backend", "family", "output", "kernel", "n_samples", "n_outputs", "dtype",
        "seconds"]
#: Columns of the CSV table: every variable except the eigenvalue list, then the error
#: bars of stochastic estimates (empty for exact rows).
CSV_COLUMNS = META + [v for v in VARIABLES if v != "eigenvalues"] + [
    "method", "trace_stderr", "entropy_stderr", "projections", "kernel_stderr"]


@dataclass(frozen=True)
class Row:
    """One measured input: its collective variables and its provenance."""

    source: str
    backend: str
    kernel: str
    n_samples: int
    n_outputs: int | None
    dtype: str
    seconds: float
    variables: CollectiveVariables | DiagonalVariables | Any
    #: The model family whose adapter shaped the call, and the output measured, in words.
    family: str | None = None
    output: str | None = None
    #: with ``--per-layer``: one :class:`cvcore.spectrum.LayerVariables` per layer
    layers: list[Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Keys: every :class:`CollectiveVariables` field plus the provenance fields;
        variables that were not computed (``--variables``) are ``None``; ``layers`` (a
        list of per-layer dicts) when the row was measured per layer."""
        out: dict[str, Any] = {k: getattr(self, k) for k in META}
        out.update(dict.fromkeys(VARIABLES))
        out.update(self.variables.to_dict())
        if self.layers is not None:
            out["layers"] = [layer.as_dict() for layer in self.layers]
        return out


def spectrum_row(source: str, kernel: Any, *, convention: str, n_outputs: int | None,
                 tolerance: float | None, started: float) -> Row:
    """A row for a kernel read from a file."""
    cv = collective_variables(kernel, tolerance=tolerance)
    dim = cv.dim
    n_samples = dim // n_outputs if (convention == "full" and n_outputs) else dim
    return Row(source=source, backend="file", kernel=convention, n_samples=n_samples,
               n_outputs=n_outputs, dtype=str(getattr(kernel, "dtype", "float64")),
               seconds=time.perf_counter() - started, variables=cv)


def format_number(value: Any) -> str:
    """Compact text for a table cell."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.6g}"
    return "" if value is None else str(value)


def csv_text(rows: Iterable[Row]) -> str:
    """The CSV table of ``rows`` (header first)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.to_dict().items()})
    return buf.getvalue()


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that it is never seen half-written: temp file, then rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_done(path: Path) -> set[str]:
    """Sources already in a CSV table (for ``--resume``)."""
    if not path.exists():
        return set()
    with path.open(newline="", encoding="utf-8") as fh:
        return {r["source"] for r in csv.DictReader(fh) if r.get("source")}


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV table written by :func:`csv_text`."""
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


class CsvSink:
    """Keeps a CSV file valid after every row: rewritten atomically each time.

    With ``resume``, rows already in the file are kept and their sources reported in
    :attr:`done` so the caller can skip them.
    """

    def __init__(self, path: Path, *, resume: bool = False) -> None:
        self.path = Path(path)
        self.kept: list[dict[str, str]] = read_rows(self.path) if resume and self.path.exists() else []
        self.done = {r["source"] for r in self.kept}
        self.rows: list[Row] = []

    def add(self, row: Row) -> None:
        self.rows.append(row)
        text = csv_text(self.rows)
        if self.kept:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore",
                                    lineterminator="\n")
            for old in self.kept:
                writer.writerow(old)
            header, _, body = text.partition("\n")
            text = header + "\n" + buf.getvalue() + body
        write_atomic(self.path, text)
