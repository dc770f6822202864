"""Formatting rows for the terminal, JSON and CSV. Nothing here computes a variable."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from cvcore import progress
from cvcore.rows import Row, format_number

TABLE_COLUMNS = ["source", "kernel", "n_samples", "trace", "normalized_trace", "entropy",
                 "effective_entropy", "effective_rank", "self_entropy", "covariance_entropy",
                 "seconds"]
SHORT = {"normalized_trace": "trace/D", "effective_entropy": "S/lnD",
         "effective_rank": "eff.rank", "self_entropy": "self-S", "covariance_entropy": "cov-S",
         "n_samples": "N"}
#: What each short header means, printed under the table.
LEGEND = {
    "N": "probe samples",
    "trace": "Tr K",
    "trace/D": "normalized trace Tr K / D, the mean eigenvalue (D = N traced, N·O full)",
    "entropy": "von Neumann entropy S = -Σ p ln p of p = λ / Tr K (natural log)",
    "S/lnD": "effective entropy S / ln D, 0 … 1",
    "eff.rank": "effective rank exp(S), 1 … D",
    "self-S": "self-entropy of the per-sample gradient norms √K_ii",
    "cov-S": "covariance entropy, the entropy of the cosine-normalized kernel",
    "seconds": "time to load and measure the checkpoint",
}
#: The kernel conventions, for the line that says which one was used.
CONVENTIONS = {
    "traced": "traced kernel K_ij = (1/O) Σ_o J_io·J_jo, N × N",
    "full": "full kernel K_(io),(jo') = J_io·J_jo', N·O × N·O",
}


def stderr() -> Console:
    """Where progress and logs go, so stdout stays clean for ``--json``."""
    return Console(stderr=True, highlight=False)


def print_table(rows: Sequence[Row], title: str | None = None, notes: Sequence[str] = ()) -> None:
    """A rich table of the rows on stdout, then which kernel and how many samples were
    used, a legend of the headers, and ``notes``. Failed rows are listed below it."""
    table = Table(title=title)
    columns = TABLE_COLUMNS
    if any(r.family or r.output for r in rows):  # which family and output each row measured
        columns = columns[:1] + ["family", "output"] + columns[1:]
    for col in columns:
        table.add_column(SHORT.get(col, col), justify="left" if col == "source" else "right")
    good = [r for r in rows if r.error is None]
    for row in good:
        d = row.to_dict()
        table.add_row(*(format_number(d[c]) for c in columns))
    console = Console(highlight=False, width=max(160, Console().width))
    if good or not rows:
        console.print(table)
    for line in describe_rows(good):
        console.print(line, markup=False)
    if good:
        console.print("columns: " + "; ".join(f"{k}: {v}" for k, v in LEGEND.items()),
                      markup=False, soft_wrap=True)
    for note in notes:
        console.print(note, markup=False, soft_wrap=True)
    for row in rows:
        if row.error is not None:
            console.print(f"failed: {failure_text(row)}", markup=False, soft_wrap=True)


def failure_text(row: Row) -> str:
    """A failed row's error, prefixed with its source unless the message names it."""
    error = row.error or ""
    return error if error.startswith(row.source) else f"{row.source}: {error}"


def describe_rows(rows: Sequence[Row]) -> list[str]:
    """One line per (kernel, N, dtype) combination the rows were measured with."""
    seen: dict[tuple[str, int, str], None] = {}
    for row in rows:
        seen[(row.kernel, row.n_samples, row.dtype)] = None
    return [f"measured: {CONVENTIONS.get(k, k)}; N = {n} samples; {dt}" for k, n, dt in seen]


def plain(text: str) -> str:
    """Text that rich prints as is (``[jax]`` is not read as markup)."""
    from rich.markup import escape

    return escape(text)


def print_json(rows: Sequence[Row]) -> None:
    """A JSON list, one object per row, on stdout."""
    payload: list[dict[str, Any]] = [r.to_dict() for r in rows]
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")


def progress_wanted(quiet: bool, stream: TextIO | None = None) -> bool:
    """A bar only for a person watching: not with ``--quiet``, not when stderr is a file or
    a pipe."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not quiet and bool(isatty and isatty())


@contextmanager
def progress_bar(enabled: bool) -> Iterator[None]:
    """A rich progress bar on stderr fed by :mod:`cvcore.progress`, one line per stage
    (checkpoints, sample blocks, estimator products); removed when the work ends."""
    if not enabled:
        yield
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=stderr(), transient=True)
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int | None) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    with bar, progress.reporting(update):
        yield
