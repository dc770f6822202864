"""`cv spectrum`: collective variables of kernels computed elsewhere."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from cvcore.cli.common import CsvOpt, JsonOpt, emit

from cvcore.data_io import read_kernel
from cvcore.errors import InputError
from cvcore.files import write_text_atomic
from cvcore.rows import csv_text, spectrum_row


def spectrum(
    kernels: Annotated[list[Path], typer.Argument(help="Kernel files (.npy, or .npz with --key).")],
    key: Annotated[str | None, typer.Option(help="Array name inside an .npz file.")] = None,
    kernel: Annotated[str, typer.Option(help="The kernel's convention, for the report: traced or full.")] = "traced",
    outputs: Annotated[int | None, typer.Option(help="O, outputs per sample, for a full kernel.")] = None,
    tolerance: Annotated[float | None, typer.Option(help="Relative round-off tolerance for negative eigenvalues.")] = None,
    as_json: JsonOpt = False,
    csv: CsvOpt = None,
) -> None:
    """Collective variables of kernels computed elsewhere."""
    if kernel not in ("traced", "full"):
        raise InputError(f"expected --kernel traced or full, got {kernel!r}")
    rows = []
    for path in kernels:
        started = time.perf_counter()
        matrix = read_kernel(path, key)
        rows.append(spectrum_row(str(path), matrix, convention=kernel, n_outputs=outputs,
                                 tolerance=tolerance, started=started))
    if csv is not None:
        write_text_atomic(csv, csv_text(rows))
    emit(rows, as_json, "collective variables")
