"""`cv plot`: entropy, trace, loss, logged extras, alignment, kernel motion and spectrum of
recorded runs, or the phase plots."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cvcore.cli.console import stderr
from cvcore.cli.export import check_outputs

from cvcore.errors import InputError
from cvcore.record.plotting import PlotRun, plot_runs
from cvcore.record.store import RecordStore

#: Above this many records in all, a progress bar shows on stderr.
PROGRESS_RECORDS = 2000


def plot(
    stores: Annotated[list[Path], typer.Argument(help="Record stores (.db); every run in each is overlaid.")],
    out: Annotated[Path, typer.Option("--out", help="The figure: .png, .pdf or .svg.")] = Path("cv.png"),
    phase: Annotated[bool, typer.Option(help="Phase plots: entropy and ln trace against ln loss.")] = False,
    run: Annotated[str | None, typer.Option(help="Only this run (id or name) of each store.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing figure at --out.")] = False,
) -> None:
    """Entropy, trace (log scale), loss and the logged extras against step; alignment, kernel velocity and the spectrum over time when recorded; mean ± std bands over subsets; runs overlaid, seeds pooled into mean ± std; Tr K / N when probe sizes differ."""
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise InputError(f"expected --out ending in .png, .pdf or .svg, got {str(out)!r}")
    # an existing figure is redrawn; a store, its side files, a directory, a missing or
    # read-only folder are refused before anything is read
    check_outputs(list(stores), {"--out": out}, force=force)
    runs: list[PlotRun] = []
    sources: list[Path] = []
    for path in stores:
        with RecordStore(path, create=False) as store:
            infos = store.runs() if run is None else [store.run(run)]
            for info in infos:
                runs.append(PlotRun(label=info.name, info=info, records=store.records(info.id)))
                sources.append(path)
    names = [r.label for r in runs]
    if len(set(names)) < len(names):  # the same name in several files: say which file
        runs = [PlotRun(label=f"{src}: {r.label}", info=r.info, records=r.records)
                for src, r in zip(sources, runs)]
    total = sum(len(r.records) for r in runs)
    if total == 0:
        raise InputError(f"expected records to plot, got none: "
                         f"{', '.join(str(p) for p in stores)} holds no records yet")
    log = stderr()
    if total >= PROGRESS_RECORDS:
        from rich.progress import Progress

        with Progress(console=log, transient=True) as bar:
            task = bar.add_task(f"plotting {len(runs)} runs ({total} records)", total=len(runs))
            plot_runs(runs, out, phase=phase, tick=lambda: bar.advance(task))
    else:
        plot_runs(runs, out, phase=phase)
    log.print(f"wrote {out} ({len(runs)} runs, {total} records)", markup=False)
