"""`cv sweep`: train and record every cell of a grid, locally or on a Dask cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cvcore.cli.console import stderr


def sweep(
    config: Annotated[Path, typer.Argument(help="The sweep's config file (.toml; see docs/sweep.md).")],
    out: Annotated[Path | None, typer.Option(help="The sweep directory (default: runs/<config name>).")] = None,
    workers: Annotated[int, typer.Option(help="Cells run at once (processes, or Dask workers).")] = 2,
    engine: Annotated[str, typer.Option(help="local (worker processes) or dask.")] = "local",
    order: Annotated[str, typer.Option(help="largest (largest cells first) or grid (the file's order).")] = "largest",
    scheduler: Annotated[str | None, typer.Option(help="With --engine dask: tcp://host:port, or slurm, pbs, sge (dask-jobqueue); none starts a local cluster.")] = None,
    allow_large: Annotated[bool, typer.Option("--allow-large", help="Run a sweep of more than 10,000 cells or estimated at more than an hour (refused without it).")] = False,
) -> None:
    """Train and record every cell of a grid; finished cells are not redone.

    Ctrl-C stops the sweep within seconds: its running cells are marked interrupted,
    sweep.json is written, and the exit status is 130; the same command resumes it.
    """
    from cvcore.sweep import load_config, run_sweep
    from cvcore.sweep.run import SweepInterrupted, check_options

    check_options(engine=engine, workers=workers, scheduler=scheduler, order=order)
    cfg = load_config(config)
    try:
        summary = run_sweep(cfg, out if out is not None else Path("runs") / cfg.name,
                            engine=engine, workers=workers, scheduler=scheduler,
                            order=order, allow_large=allow_large)
    except SweepInterrupted as exc:
        stderr().print(str(exc), markup=False, soft_wrap=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:  # before any cell started: nothing to mark
        stderr().print("interrupted: the sweep stopped before any cell ran", markup=False)
        raise typer.Exit(130) from None
    if summary["failed"]:
        raise typer.Exit(1)
