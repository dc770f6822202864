"""``cv measure --per-layer``: the layer rows of measured checkpoints as a table or CSV.

JSON needs nothing here: each row's ``layers`` list is part of ``Row.to_dict``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cvcore.files import write_text_atomic
from cvcore.rows import Row, format_number

COLUMNS = ["layer", "n_params", "trace", "share", "entropy", "effective_rank"]
CSV_COLUMNS = ["source", "kernel", "n_samples", "dtype", *COLUMNS]


def print_layers(rows: Sequence[Row]) -> None:
    """One table per checkpoint: each layer's parameters, trace, share and spectrum."""
    console = Console(highlight=False, width=max(120, Console().width))
    for row in rows:
        table = Table(title=f"{row.source}: per layer ({row.kernel} kernel, N = {row.n_samples})")
        for col in COLUMNS:
            table.add_column(col, justify="left" if col == "layer" else "right")
        for layer in row.layers or []:
            d = layer.as_dict()
            table.add_row(*(format_number(d[c]) for c in COLUMNS))
        console.print(table)


def layer_csv_text(rows: Sequence[Row]) -> str:
    """One CSV line per (checkpoint, layer)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        for layer in row.layers or []:
            d = layer.as_dict()
            writer.writerow({"source": row.source, "kernel": row.kernel,
                             "n_samples": row.n_samples, "dtype": row.dtype,
                             **{c: "" if d[c] is None else d[c] for c in COLUMNS}})
    return buf.getvalue()


def write_layer_csv(path: Path, rows: Sequence[Row]) -> None:
    write_text_atomic(path, layer_csv_text(rows))
