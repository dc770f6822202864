"""`cv sweep`: train and record every cell of a grid, locally or on a Dask cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cvcore.errors import InputError


def sweep(
    config: Annotated[Path, typer.Argument(help="The sweep's config file (.toml; see docs/sweep.md).")],
    out: Annotated[Path | None, typer.Option(help="The sweep directory (default: runs/<config name>).")] = None,
    workers: Annotated[int, typer.Option(help="Cells run at once (processes, or Dask workers).")] = 2,
    engine: Annotated[str, typer.Option(help="local (worker processes) or dask.")] = "local",
    order: Annotated[str, typer.Option(help="largest (largest cells first) or grid (the file's order).")] = "largest",
    scheduler: Annotated[str | None, typer.Option(help="With --engine dask: tcp://host:port, or slurm, pbs, sge (dask-jobqueue); none starts a local cluster.")] = None,
) -> None:
    """Train and record every cell of a grid; finished cells are not redone."""
    from cvcore.sweep import load_config, run_sweep

    if engine not in ("local", "dask"):
        raise InputError(f"expected --engine local or dask, got {engine!r}")
    cfg = load_config(config)
    summary = run_sweep(cfg, out if out is not None else Path("runs") / cfg.name,
                        engine=engine, workers=workers, scheduler=scheduler,
                        order=order)
    if summary["failed"]:
        raise typer.Exit(1)
