"""``cv scaling``'s work: analyse a sweep, write the JSON summary and the figures."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cvcore.errors import InputError
from cvcore.files import check_output_path, write_text_atomic
from cvcore.scaling import figures
from cvcore.scaling.analysis import analyse, points
from cvcore.scaling.load import load_sweep

SUMMARY = "scaling.json"


#: The probe sets analysed when none are named (those of them the sweep recorded).
DEFAULT_PROBE_SETS = ("train", "test")


def scaling_report(sweep_dir: str | Path, *, out: str | Path | None = None,
                   probe_sets: Sequence[str] | None = None,
                   contrasts: Sequence[str] = (), n_boot: int = 1000,
                   plots: bool = True) -> dict[str, Any]:
    """Analyse the probe sets and write ``scaling.json`` and the figures.

    Args:
        probe_sets: the probe sets to analyse; ``None``: train and test, or every probe
            set recorded when the sweep has neither.

    Returns:
        ``{"summary": path, "figures": [paths], "analysis": {probe set: analysis}}``.

    Raises:
        InputError: not a sweep, a probe set the sweep did not record, or an output folder
            that cannot be written (checked before anything is analysed or written).
    """
    sweep = load_sweep(sweep_dir)
    recorded = sorted(sweep.cells[0].series)
    if probe_sets is None:
        present = [p for p in DEFAULT_PROBE_SETS if p in recorded] or recorded
    else:
        unknown = [p for p in probe_sets if p not in recorded]
        if unknown:
            raise InputError(f"expected --probe among the probe sets the sweep recorded "
                             f"{recorded}, got {unknown[0]!r}")
        present = list(dict.fromkeys(probe_sets))
    selections = [figures.parse_contrast(c) for c in contrasts]
    where = output_folder(Path(out) if out is not None else sweep.root / "scaling")
    names = [SUMMARY]
    dynamic = [p for p in present if recorded_dynamics(sweep, p)]
    losses = recorded_losses(sweep)
    if plots:
        names += [f"{kind}_{p}.png" for p in present
                  for kind in ("scale_diagram", "delta_S_vs_params")]
        names += [f"dynamics_vs_params_{p}.png" for p in dynamic]
        if losses:
            names += ["loss_vs_params.png"]
        names += [figures.contrast_name(s) for s in selections]
    for name in names:
        check_output_path(where / name, what="scaling output")
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
            if probe in dynamic:
                written.append(str(figures.dynamics_vs_params(
                    pts, sweep.grid, where / f"dynamics_vs_params_{probe}.png",
                    f"{name}: target alignment and kernel distance vs parameter count, "
                    f"{probe} probe")))
        if losses:  # a sweep whose cells record no loss has no loss figure
            pts = points(sweep.cells, present[0])
            written.append(str(figures.loss_vs_params(
                pts, sweep.grid, results[present[0]]["loss_power_law"],
                where / "loss_vs_params.png", f"{name}: final loss vs parameter count")))
        for sel in selections:
            written.append(str(figures.contrast(sweep, sel, where / figures.contrast_name(sel),
                                                name)))
    text = json.dumps({"probe_sets": results, "figures": written}, indent=1,
                      default=_jsonable)
    write_text_atomic(where / SUMMARY, text)
    return {"summary": str(where / SUMMARY), "figures": written, "analysis": results}


def recorded_losses(sweep: Any) -> bool:
    """Whether any cell ended with a finite training loss."""
    return any(math.isfinite(c.final_loss) for c in sweep.cells)


def recorded_dynamics(sweep: Any, probe_set: str) -> bool:
    """Whether any cell recorded the kernel's alignment or motion on this probe set."""
    return any(probe_set in c.series and c.series[probe_set].dynamics for c in sweep.cells)


def dynamics_lines(analysis: dict[str, Any]) -> list[str]:
    """One line per grid point with the kernel's alignment and motion (seed mean ± se),
    in order of parameter count; none when no cell recorded them."""
    out = []
    for p in sorted(analysis["points"], key=lambda p: p["n_params"]):
        parts = []
        for key, words in (("alignment_end", "alignment at the end"),
                           ("delta_alignment", "Δ alignment"),
                           ("kernel_distance", "kernel distance")):
            m = p.get(key) or {}
            if m.get("mean") is not None:
                se = m.get("sem")
                parts.append(f"{words} {m['mean']:.3g}" + (f" ± {se:.2g}" if se else ""))
        if parts:
            where = ", ".join(f"{k}={v}" for k, v in p["params"].items())
            out.append(f"  P = {p['n_params']:.3g} ({where}): " + "; ".join(parts))
    return out


def output_folder(where: Path) -> Path:
    """The folder for the figures and ``scaling.json``, created when missing (its parent
    must exist); one-line :class:`InputError` for a file, a missing parent or a read-only
    folder."""
    if where.exists() and not where.is_dir():
        raise InputError(f"{where}: expected a folder for --out, got a file")
    if not where.exists():
        check_output_path(where, what="--out folder")
        try:
            where.mkdir()
        except OSError as exc:
            raise InputError(f"{where}: expected a folder that can be created for --out, "
                             f"got {exc.strerror}") from None
    return where


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
