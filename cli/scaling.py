"""`cv scaling`: the scale diagram of a sweep (figures and a JSON summary)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from cvcore.cli.common import JsonOpt


def scaling(
    sweep_dir: Annotated[Path, typer.Argument(help="A sweep directory (cv sweep's --out).")],
    out: Annotated[Path | None, typer.Option(help="Where figures and scaling.json go (default: SWEEP_DIR/scaling).")] = None,
    probe: Annotated[list[str] | None, typer.Option(help="Probe sets to analyse (default: train and test, or every one recorded when the sweep has neither).")] = None,
    contrast: Annotated[list[str] | None, typer.Option(help='Training curves of a contrast, e.g. "width=12,1000 depth=3 activation=relu" (repeatable).')] = None,
    boot: Annotated[int, typer.Option(help="Bootstrap resamples over seeds.")] = 1000,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write the figures (needs matplotlib).")] = True,
    as_json: JsonOpt = False,
) -> None:
    """ΔS, Δ ln Tr and the final loss over a sweep's grid; sign changes of ΔS with a
    bootstrap over seeds; power-law and log fits; the target alignment and kernel distance
    against parameter count where the cells recorded them; figures and scaling.json."""
    from cvcore.errors import InputError
    from cvcore.scaling.report import dynamics_lines, scaling_report, sign_change_lines

    if boot < 1:
        raise InputError(f"expected --boot a positive integer, got {boot}")
    result = scaling_report(sweep_dir, out=out, probe_sets=probe or None,
                            contrasts=contrast or (), n_boot=boot, plots=plots)
    if as_json:
        typer.echo(json.dumps(result["analysis"], indent=1, default=str))
        return
    for name, analysis in result["analysis"].items():
        cells = analysis["cells"]
        typer.echo(f"{name} probe: {cells['done']} cells, {len(cells['failed'])} failed, "
                   f"{len(cells['not_run'])} not run; ΔS = S(end) − S(start)")
        changes = sign_change_lines(analysis)
        typer.echo(f" sign changes of ΔS: {len(changes)}")
        for line in changes:
            typer.echo(line)
        dyn = dynamics_lines(analysis)
        if dyn:
            typer.echo(" target alignment and kernel distance (1 − cos, start to end) "
                       "against parameter count (mean ± se over seeds):")
            for line in dyn:
                typer.echo(line)
    typer.echo(f"summary: {result['summary']}")
    for fig in result["figures"]:
        typer.echo(f"figure: {fig}")
