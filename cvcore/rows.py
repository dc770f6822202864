"""Rows of results: one per measured input, with where the number came from."""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cvcore.errors import InputError
from cvcore.files import write_text_atomic
from cvcore.spectrum import CollectiveVariables, DiagonalVariables, collective_variables

VARIABLES = [f.name for f in fields(CollectiveVariables)]
META = ["source", "backend", "family", "output", "kernel", "n_samples", "n_outputs", "dtype",
        "seconds"]
#: Columns of the CSV table: every variable except the eigenvalue list, then the error
#: bars of stochastic estimates (empty for exact rows), the settings the row was measured
#: with (JSON, what ``--resume`` compares) and the error of a checkpoint that failed.
CSV_COLUMNS = META + [v for v in VARIABLES if v != "eigenvalues"] + [
    "method", "trace_stderr", "entropy_stderr", "projections", "kernel_stderr", "settings",
    "error"]


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
    #: The measurement's settings as canonical JSON (see :func:`settings_text`), or ``None``.
    settings: str | None = None
    #: Why the checkpoint could not be measured (its variables are then all ``None``).
    error: str | None = None
    #: The measured model's ``module.QualName`` and trainable parameter count, when known
    #: (stored by ``cv measure --out``; not table, JSON or CSV columns).
    model_class: str | None = None
    n_params: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Keys: every :class:`CollectiveVariables` field plus the provenance fields;
        variables that were not computed (``--variables``) are ``None``; ``layers`` (a
        list of per-layer dicts) when the row was measured per layer."""
        out: dict[str, Any] = {k: getattr(self, k) for k in META}
        out.update(dict.fromkeys(VARIABLES))
        if self.variables is not None:
            out.update(self.variables.to_dict())
        if self.layers is not None:
            out["layers"] = [layer.as_dict() for layer in self.layers]
        out["settings"] = self.settings
        out["error"] = self.error
        return out


def settings_text(settings: dict[str, Any]) -> str:
    """Canonical JSON of a measurement's settings (sorted keys, no spaces).

    >>> settings_text({"samples": 50, "data": "digits"})
    '{"data":"digits","samples":50}'
    """
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def settings_mismatch(stored: str, current: str) -> str:
    """The settings that differ between two :func:`settings_text` strings, as text.

    >>> settings_mismatch('{"samples":50,"seed":0}', '{"samples":100,"seed":0}')
    'samples 50 (in the file) vs 100 (now)'
    """
    try:
        old = json.loads(stored) if stored else {}
    except json.JSONDecodeError:
        old = {}
    new = json.loads(current)
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k} {json.dumps(old.get(k))} (in the file) vs {json.dumps(new.get(k))} (now)"
                     for k in keys if old.get(k) != new.get(k))


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


def read_done(path: Path) -> set[str]:
    """Sources already in a CSV table (for ``--resume``)."""
    if not path.exists():
        return set()
    with path.open(newline="", encoding="utf-8") as fh:
        return {r["source"] for r in csv.DictReader(fh) if r.get("source")}


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV table written by :func:`csv_text`."""
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: expected a CSV table (UTF-8 text), got content that is not "
                         f"({type(exc).__name__}); pass another --csv, or --force to overwrite "
                         "it") from None


class CsvSink:
    """Keeps a CSV file valid after every row: rewritten atomically each time.

    An existing table of rows is refused unless ``resume`` (keep its rows and report their
    sources in :attr:`done`, so the caller skips them) or ``force`` (start it over). With
    ``resume`` and ``settings``, every kept row must have been measured with the same
    settings, else :class:`~cvcore.errors.InputError` names the ones that differ. Failed
    rows (with an ``error``) are not kept: resuming measures them again.
    """

    def __init__(self, path: Path, *, resume: bool = False, force: bool = False,
                 settings: str | None = None) -> None:
        self.path = Path(path)
        old = read_rows(self.path) if self.path.is_file() and not force else []
        if old and not (resume or force):
            raise InputError(
                f"{self.path}: expected a new --csv file, got a table of {len(old)} rows; "
                "pass --resume to continue it or --force to overwrite it"
            )
        self.kept: list[dict[str, str]] = [r for r in old if not r.get("error")] if resume else []
        if settings is not None:
            for r in self.kept:
                if r.get("settings", "") != settings:
                    raise InputError(
                        f"{self.path}: expected rows measured with the same settings to "
                        f"--resume, got {r.get('source')} with "
                        f"{settings_mismatch(r.get('settings', ''), settings)}; nothing was "
                        "measured. Use the same settings, another --csv, or --force to start over"
                    )
        self.done = {r["source"] for r in self.kept}
        self.rows: list[Row] = []

    def add(self, row: Row) -> None:
        """Append a row and rewrite the file; failed rows are written only along with a
        measured one, so a run where nothing could be measured leaves no file."""
        self.rows.append(row)
        if not self.kept and all(r.error is not None for r in self.rows):
            return
        text = csv_text(self.rows)
        if self.kept:
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore",
                                    lineterminator="\n")
            for old in self.kept:
                writer.writerow(old)
            header, _, body = text.partition("\n")
            text = header + "\n" + buf.getvalue() + body
        write_text_atomic(self.path, text)
