"""Formatting rows for the terminal, JSON and CSV. Nothing here computes a variable."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from cvcore.report import Row, format_number

TABLE_COLUMNS = ["source", "kernel", "n_samples", "trace", "normalized_trace", "entropy",
                 "effective_entropy", "effective_rank", "self_entropy", "covariance_entropy",
                 "seconds"]
SHORT = {"normalized_trace": "trace/D", "effective_entropy": "S/lnD",
         "effective_rank": "eff.rank", "self_entropy": "self-S", "covariance_entropy": "cov-S",
         "n_samples": "N"}


def stderr() -> Console:
    """Where progress and logs go, so stdout stays clean for ``--json``."""
    return Console(stderr=True, highlight=False)


def print_table(rows: Sequence[Row], title: str | None = None) -> None:
    """A rich table of the rows on stdout."""
    table = Table(title=title)
    columns = TABLE_COLUMNS
    if any(r.family or r.output for r in rows):  # which family and output each row measured
        columns = columns[:1] + ["family", "output"] + columns[1:]
    for col in columns:
        table.add_column(SHORT.get(col, col), justify="left" if col == "source" else "right")
    for row in rows:
        d = row.to_dict()
        table.add_row(*(format_number(d[c]) for c in columns))
    Console(highlight=False, width=max(160, Console().width)).print(table)


def print_json(rows: Sequence[Row]) -> None:
    """A JSON list, one object per row, on stdout."""
    payload: list[dict[str, Any]] = [r.to_dict() for r in rows]
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
