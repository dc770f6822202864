"""``cv scaling``'s work: analyse a sweep, write the JSON summary and the figures."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cvcore.report import write_atomic
from cvcore.scaling import figures
from cvcore.scaling.analysis import analyse, points
from cvcore.scaling.load import load_sweep

SUMMARY = "scaling.json"


def scaling_report(sweep_dir: str | Path, *, out: str | Path | None = None,
                   probe_sets: Sequence[str] = ("train", "test"),
                   contrasts: Sequence[str] = (), n_boot: int = 1000,
                   plots: bool = True) -> dict[str, Any]:
    """Analyse every probe set present and write ``scaling.json`` and the figures.

    Returns:
        ``{"summary": path, "figures": [paths], "analysis": {probe set: analysis}}``.
    """
    sweep = load_sweep(sweep_dir)
    where = Path(out) if out is not None else sweep.root / "scaling"
    where.mkdir(parents=True, exist_ok=True)
    selections = [figures.parse_contrast(c) for c in contrasts]
    present = [p for p in probe_sets if p in sweep.cells[0].series] or \
        sorted(sweep.cells[0].series)
    results = {p: analyse(sweep, probe_set=p, n_boot=n_boot) for p in present}
    written: list[str] = []
    if plots:
        name = sweep.root.name
        for probe in present:
            pts = points(sweep.cells, probe)
            res = results[probe]
            written.append(str(figures.scale_diagram(
                pts, sweep.grid, where / f"scale_diagram_{probe}.png",
                f"{name}: scale diagram, {probe} probe (mean over {len(res['seeds'])} seeds)")))
            written.append(str(figures.delta_vs_params(
                pts, sweep.grid, res["sign_changes"], where / f"delta_S_vs_params_{probe}.png",
                f"{name}: ΔS vs parameter count, {probe} probe")))
        pts = points(sweep.cells, present[0])
        written.append(str(figures.loss_vs_params(
            pts, sweep.grid, results[present[0]]["loss_power_law"],
            where / "loss_vs_params.png", f"{name}: final loss vs parameter count")))
        for sel in selections:
            written.append(str(figures.contrast(sweep, sel, where / figures.contrast_name(sel),
                                                name)))
    text = json.dumps({"probe_sets": results, "figures": written}, indent=1,
                      default=_jsonable)
    write_atomic(where / SUMMARY, text)
    return {"summary": str(where / SUMMARY), "figures": written, "analysis": results}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value).__name__}")


def sign_change_lines(analysis: dict[str, Any]) -> list[str]:
    """One line per sign change, for the terminal."""
    out = []
    for ch in analysis["sign_changes"]:
        fixed = ", ".join(f"{k}={v}" for k, v in ch["fixed"].items())
        std = ch["log10_P_std"]
        lo, hi = ch["P_95"] or (math.nan, math.nan)
        out.append(f"  along {ch['along']} at {fixed}: {ch['direction']} at P ≈ {ch['P']:.3g} "
                   f"(log10 P = {ch['log10_P']:.2f}" + (f" ± {std:.2f}" if std else "")
                   + f", 95% {lo:.3g}..{hi:.3g}, support {ch['support']:.2f}"
                   + (", within noise" if ch["within_noise"] else "") + ")")
    return out
