"""Formatting rows for the terminal, JSON and CSV. Nothing here computes a variable."""

from __future__ import annotations

import json
import math
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
    dicts = [r.to_dict() for r in good]
    sketched = any(d.get("kernel_stderr") is not None for d in dicts)
    if sketched:
        table.add_column("K rel.se", justify="right", no_wrap=True)
    estimated = False
    for d in dicts:
        errors = column_errors(d)
        estimated = estimated or bool(errors)
        cells = [cell(d[c], errors.get(c, UNKNOWN if errors and c in ESTIMATES else None))
                 for c in columns]
        if sketched:
            cells.append(format_number(d.get("kernel_stderr")))
        table.add_row(*cells)
    console = Console(highlight=False, width=max(220 if estimated else 160, Console().width))
    if good or not rows:
        console.print(table)
    for line in describe_rows(good):
        console.print(line, markup=False)
    if good:
        console.print("columns: " + "; ".join(f"{k}: {v}" for k, v in LEGEND.items()),
                      markup=False, soft_wrap=True)
    if estimated:
        console.print(ERRORS_NOTE, markup=False, soft_wrap=True)
    for note in notes:
        console.print(note, markup=False, soft_wrap=True)
    for row in rows:
        if row.error is not None:
            console.print(f"failed: {failure_text(row)}", markup=False, soft_wrap=True)


#: Printed under a table that holds estimates with standard errors.
ERRORS_NOTE = ("± : the standard error of a stochastic or sketched estimate (over probe "
               "vectors or projections; ± 0: computed exactly, e.g. the trace from the "
               "kernel's diagonal); trace/D, S/lnD and eff.rank carry the trace's and "
               "entropy's errors (eff.rank to first order, exp(S)·se(S)); ± ?: estimated "
               "without an error (self-S, cov-S of a sketched kernel); K rel.se: the "
               "sketched kernel's relative error ‖se of its entries‖_F / ‖K̂‖_F")
#: A cell of an estimated row whose error is not known.
UNKNOWN = math.nan
#: The columns that are estimates in a stochastic or sketched row.
ESTIMATES = ("trace", "normalized_trace", "entropy", "effective_entropy", "effective_rank",
             "self_entropy", "covariance_entropy")


def column_errors(d: dict[str, Any]) -> dict[str, float]:
    """The standard error of each variable a row estimated (none for exact rows).

    ``trace_stderr`` and ``entropy_stderr`` are the estimator's; the normalized trace,
    effective entropy and effective rank are fixed functions of them (``Tr / D``,
    ``S / ln D``, ``exp(S)``), so their errors are scaled the same way (first order).

    >>> e = column_errors({"method": "stochastic", "trace": 10.0, "trace_stderr": 0.5,
    ...                    "normalized_trace": 2.0, "entropy": 1.0, "entropy_stderr": 0.1,
    ...                    "effective_rank": 2.718281828, "effective_entropy": 0.5})
    >>> round(e["normalized_trace"], 6), round(e["effective_rank"], 6), e["effective_entropy"]
    (0.1, 0.271828, 0.05)
    """
    if d.get("method") not in ("stochastic", "sketched"):
        return {}
    out: dict[str, float] = {}
    t_se, s_se = d.get("trace_stderr"), d.get("entropy_stderr")
    if isinstance(t_se, (int, float)):
        out["trace"] = float(t_se)
        trace, nt = d.get("trace"), d.get("normalized_trace")
        if isinstance(trace, (int, float)) and isinstance(nt, (int, float)) and trace:
            out["normalized_trace"] = float(t_se) * nt / trace
    if isinstance(s_se, (int, float)):
        out["entropy"] = float(s_se)
        rank, entropy, eff = d.get("effective_rank"), d.get("entropy"), d.get("effective_entropy")
        if isinstance(rank, (int, float)):
            out["effective_rank"] = float(rank) * float(s_se)
        if isinstance(eff, (int, float)) and isinstance(entropy, (int, float)) and entropy:
            out["effective_entropy"] = float(s_se) * eff / entropy
    return out


def cell(value: Any, se: float | None) -> str:
    """A table cell: the value, and ``± se`` when it has one.

    >>> cell(1.25, 0.03), cell(1.25, None)
    ('1.25 ± 0.03', '1.25')
    """
    text = format_number(value)
    if se is None or value is None or not text:
        return text
    return f"{text} ± ?" if math.isnan(se) else f"{text} ± {se:.2g}"


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


#: Seconds between plain progress lines when stderr is a file, a pipe or a notebook; none
#: is written before the first interval has passed, so short work (and a mistake) leaves
#: stderr to its one line.
PLAIN_INTERVAL = 30.0


def progress_wanted(quiet: bool, stream: TextIO | None = None) -> bool:
    """Progress unless ``--quiet``: a bar on a terminal, plain lines with the time left in
    a log file or a notebook (:func:`cvcore.progress.shown`)."""
    del stream  # where it goes decides how it looks, not whether
    return not quiet


@contextmanager
def progress_bar(enabled: bool) -> Iterator[None]:
    """A rich progress bar on stderr fed by :mod:`cvcore.progress`, one line per stage
    (checkpoints, sample blocks, estimator products) with the time elapsed and left
    (:func:`cvcore.progress.shown`); removed when the work ends. When stderr is not a
    terminal, plain lines every :data:`PLAIN_INTERVAL` seconds instead."""
    if not enabled:
        yield
        return
    with progress.shown(sys.stderr, interval=PLAIN_INTERVAL):
        yield
