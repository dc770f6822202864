"""The scale diagram as figures (matplotlib, the optional ``plot`` extra).

Each function takes the analysed points (or the sweep) and writes one PNG.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cvcore.files import atomic_output
from cvcore.imports import require
from cvcore.scaling.analysis import SEED, Point, axes, lines
from cvcore.scaling.load import CellData, SweepData

LABELS = {"delta_S": "ΔS = S(end) − S(start)", "delta_S_min": "S(end) − min S",
          "delta_ln_trace": "Δ ln Tr", "final_loss": "final train loss",
          "min_step": "epoch of min S", "alignment_end": "target alignment at the end",
          "delta_alignment": "Δ target alignment",
          "kernel_distance": "kernel distance, start to end"}


def text_colour(rgba: Sequence[float]) -> str:
    """Black or white, whichever reads better on a cell of colour ``rgba`` (by its
    relative luminance, WCAG: the contrast of black is the larger above 0.179).

    >>> text_colour((1.0, 1.0, 0.9, 1.0)), text_colour((0.1, 0.0, 0.3, 1.0))
    ('k', 'w')
    """
    def channel(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(float(c)) for c in rgba[:3])
    return "k" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 else "w"


def _legend_outside(ax: Any, fontsize: float) -> None:
    """The legend to the right of the axes, off every curve."""
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=fontsize, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                  borderaxespad=0.0, frameon=False)


def pyplot() -> Any:
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(pts: Sequence[Point], group: Sequence[str]) -> list[tuple[str, list[Point]]]:
    out: dict[str, list[Point]] = {}
    for p in pts:
        title = ", ".join(f"{k}={p.params[k]}" for k in group if k in p.params)
        out.setdefault(title, []).append(p)
    return list(out.items())


def _save(fig: Any, path: Path) -> Path:
    """Write a figure atomically (its folder was checked by the caller) and close it."""
    try:
        with atomic_output(path, suffix=path.suffix or ".png") as tmp:
            fig.savefig(tmp, dpi=90, bbox_inches="tight")
    finally:
        pyplot().close(fig)
    return path


def scale_diagram(pts: Sequence[Point], grid: dict[str, list[Any]], path: Path,
                  title: str) -> Path:
    """Heat maps over the two size axes, one column per group: ΔS, S(end) − min S, the
    epoch of the minimum, Δ ln Tr and the final loss (seed means, values in the cells)."""
    plt = pyplot()
    size, group = axes(grid)
    xkey = size[0] if size else None
    ykey = size[1] if len(size) > 1 else None
    xs = grid[xkey] if xkey else [None]
    ys = grid[ykey] if ykey else [None]
    panels = _panels(pts, group)
    metrics = ["delta_S", "delta_S_min", "min_step", "delta_ln_trace", "final_loss"]
    fig, axs = plt.subplots(len(metrics), len(panels), squeeze=False,
                            figsize=(1.1 + 0.75 * len(xs) * len(panels), 1.1 * len(metrics)
                                     * max(2.0, 0.55 * len(ys) + 0.9)))
    for col, (name, members) in enumerate(panels):
        for row, metric in enumerate(metrics):
            ax = axs[row][col]
            grid_values = np.full((len(ys), len(xs)), np.nan)
            for p in members:
                i = ys.index(p.params[ykey]) if ykey else 0
                j = xs.index(p.params[xkey]) if xkey else 0
                grid_values[i, j] = p.mean(metric)
            if metric in ("delta_S", "delta_ln_trace"):
                lim = float(np.nanmax(np.abs(grid_values))) or 1.0
                im = ax.imshow(grid_values, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto",
                               origin="lower")
            elif metric == "final_loss":
                im = ax.imshow(np.log10(grid_values), cmap="viridis", aspect="auto",
                               origin="lower")
            else:
                im = ax.imshow(grid_values, cmap="magma", aspect="auto", origin="lower")
            shown = np.log10(grid_values) if metric == "final_loss" else grid_values
            for (i, j), v in np.ndenumerate(grid_values):
                if math.isfinite(v):  # black or white by the cell's own colour
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6,
                            color=text_colour(im.cmap(im.norm(shown[i, j]))))
            if xkey:
                ax.set_xticks(range(len(xs)), [str(x) for x in xs], fontsize=7)
            else:
                ax.set_xticks([])
            if ykey:
                ax.set_yticks(range(len(ys)), [str(y) for y in ys], fontsize=7)
            else:
                ax.set_yticks([])
            if row == len(metrics) - 1 and xkey:
                ax.set_xlabel(xkey)
            if col == 0:
                ax.set_ylabel(LABELS[metric] + (f"\n{ykey}" if ykey else ""), fontsize=8)
            if row == 0 and name:
                ax.set_title(name, fontsize=9)
            cb = fig.colorbar(im, ax=ax, fraction=0.05)
            cb.ax.tick_params(labelsize=6)
            if metric == "final_loss":
                cb.set_label("log10", fontsize=6)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def delta_vs_params(pts: Sequence[Point], grid: dict[str, list[Any]],
                    changes: Sequence[dict[str, Any]], path: Path, title: str,
                    metric: str = "delta_S") -> Path:
    """ΔS against parameter count: seed means ± std along the first size axis, each seed
    as a dot, one panel per group; sign changes as vertical bands (95 % bootstrap)."""
    along, group, panels, fig, axs, colors = _against_params(pts, grid)
    for col, (name, members) in enumerate(panels):
        ax = axs[0][col]
        for k, (fixed, line) in enumerate(lines(members, along)):
            c = colors[k % len(colors)]
            label = ", ".join(f"{a}={b}" for a, b in fixed.items() if a not in group) or None
            n = np.asarray([p.n_params for p in line])
            ax.errorbar(n, [p.mean(metric) for p in line], yerr=[p.std(metric) for p in line],
                        marker="o", ms=3, color=c, capsize=2, label=label)
            for p in line:
                ax.scatter(np.full(p.values[metric].size, p.n_params), p.values[metric],
                           s=5, color=c, alpha=0.35)
            for ch in changes:
                if ch["along"] == along and ch["fixed"] == fixed and ch.get("P_95"):
                    lo, hi = ch["P_95"]
                    ax.axvspan(lo, hi, color=c, alpha=0.12)
                    ax.axvline(ch["P"], color=c, ls=":", lw=1)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        if name:
            ax.set_title(name, fontsize=9)
        if col == 0:
            ax.set_ylabel(LABELS[metric])
        _legend_outside(ax, 7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def loss_vs_params(pts: Sequence[Point], grid: dict[str, list[Any]],
                   fits: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Final loss against parameter count (log-log) with each line's power-law fit."""
    along, group, panels, fig, axs, colors = _against_params(pts, grid)
    for col, (name, members) in enumerate(panels):
        ax = axs[0][col]
        for k, (fixed, line) in enumerate(lines(members, along)):
            c = colors[k % len(colors)]
            n = np.asarray([p.n_params for p in line])
            fit = next((f for f in fits if f["along"] == along and f["fixed"] == fixed), None)
            label = ", ".join(f"{a}={b}" for a, b in fixed.items() if a not in group)
            if fit and fit["exponent"] is not None:
                se = fit["exponent_se"]
                label += f": α={fit['exponent']:.2f}" + (f"±{se:.2f}" if se else "")
                ax.plot(n, fit["prefactor"] * n ** fit["exponent"], color=c, lw=0.8, ls="--")
            ax.errorbar(n, [p.mean("final_loss") for p in line],
                        yerr=[p.std("final_loss") for p in line], marker="o", ms=3, color=c,
                        capsize=2, ls="none", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("trainable parameters")
        if name:
            ax.set_title(name, fontsize=9)
        if col == 0:
            ax.set_ylabel("final train loss")
        _legend_outside(ax, 6)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def dynamics_vs_params(pts: Sequence[Point], grid: dict[str, list[Any]], path: Path,
                       title: str) -> Path:
    """The kernel's alignment and motion against parameter count: the target alignment at
    the end, its change, and the kernel's distance from start to end (seed means ± std,
    each seed a dot), one row per group."""
    plt = pyplot()
    size, group = axes(grid)
    along = size[0] if size else next(k for k in grid if k != SEED)
    panels = _panels(pts, group)
    metrics = ("alignment_end", "delta_alignment", "kernel_distance")
    fig, axs = plt.subplots(len(panels), len(metrics), squeeze=False,
                            figsize=(4.4 * len(metrics), 3.1 * len(panels)))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, (name, members) in enumerate(panels):
        for col, metric in enumerate(metrics):
            ax = axs[row][col]
            for k, (fixed, line) in enumerate(lines(members, along)):
                c = colors[k % len(colors)]
                label = ", ".join(f"{a}={b}" for a, b in fixed.items() if a not in group)
                n = np.asarray([p.n_params for p in line])
                ax.errorbar(n, [p.mean(metric) for p in line],
                            yerr=[p.std(metric) for p in line], marker="o", ms=3, color=c,
                            capsize=2, label=label or None)
                for p in line:
                    ax.scatter(np.full(p.values[metric].size, p.n_params), p.values[metric],
                               s=5, color=c, alpha=0.35)
            ax.set_xscale("log")
            ax.set_xlabel("trainable parameters")
            ax.set_ylabel(LABELS[metric], fontsize=8)
            if name:
                ax.set_title(name, fontsize=9)
        _legend_outside(axs[row][-1], 7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def parse_contrast(text: str) -> dict[str, list[str]]:
    """``"width=12,1000 depth=3"`` → ``{"width": ["12", "1000"], "depth": ["3"]}``."""
    from cvcore.errors import InputError

    out: dict[str, list[str]] = {}
    for part in text.split():
        key, sep, values = part.partition("=")
        if not sep or not key or not values:
            raise InputError(f"expected --contrast as KEY=V1,V2 [KEY=V ...], got {text!r}")
        out[key] = values.split(",")
    if sum(len(v) > 1 for v in out.values()) != 1:
        raise InputError(f"expected --contrast to give several values for exactly one key "
                         f"(the contrast) and one value for the others, got {text!r}")
    return out


def _matches(cell: CellData, selection: dict[str, list[str]]) -> str | None:
    """The contrast value a cell belongs to, or None."""
    label = None
    for key, values in selection.items():
        value = str(cell.params.get(key))
        if value not in values:
            return None
        if len(values) > 1:
            label = f"{key}={value}"
    return label


def contrast(sweep: SweepData, selection: dict[str, list[str]], path: Path,
             title: str) -> Path:
    """Entropy and ln Tr over training for the contrasted values (mean over seeds and any
    unnamed key, band: min to max), train probe solid, test probe dashed."""
    from cvcore.errors import InputError

    plt = pyplot()
    key = next(k for k, v in selection.items() if len(v) > 1)
    unknown = [k for k in selection if k not in sweep.grid]
    if unknown:
        raise InputError(f"expected --contrast keys among the grid's {list(sweep.grid)}, got "
                         f"{unknown}")
    groups: dict[str, list[CellData]] = {f"{key}={v}": [] for v in selection[key]}
    for cell in sweep.cells:
        label = _matches(cell, selection)
        if label is not None:
            groups[label].append(cell)
    empty = [k for k, v in groups.items() if not v]
    if empty:
        raise InputError(f"expected finished cells for --contrast {empty}, got none")
    fig, axs = plt.subplots(1, 3, figsize=(12, 3.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (label, cells) in enumerate(groups.items()):
        c = colors[k % len(colors)]
        n_params = int(np.mean([x.n_params for x in cells]))
        for probe, style in (("train", "-"), ("test", "--")):
            if probe not in cells[0].series:
                continue
            step = cells[0].series[probe].step
            for ax, var in ((axs[0], "entropy"), (axs[1], "trace")):
                vals = np.asarray([getattr(x.series[probe], var) for x in cells])
                if var == "trace":
                    vals = np.log(vals)
                ax.plot(step, vals.mean(axis=0), style, color=c,
                        label=f"{label} (P={n_params}) {probe}")
                ax.fill_between(step, vals.min(axis=0), vals.max(axis=0), color=c, alpha=0.15)
        loss = np.asarray([x.loss for x in cells])
        axs[2].plot(cells[0].step, loss.mean(axis=0), color=c, label=label)
    axs[0].set_ylabel("entropy S")
    axs[1].set_ylabel("ln Tr K")
    axs[2].set_ylabel("train loss")
    axs[2].set_yscale("log")
    for ax in axs:
        ax.set_xlabel("epoch")
    handles, labels = axs[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7,
               ncols=min(4, len(labels)), frameon=False)  # below the panels, off the curves
    fixed = ", ".join(f"{k}={v[0]}" for k, v in selection.items() if len(v) == 1)
    n_seeds = len({x.params.get(SEED) for cells in groups.values() for x in cells})
    fig.suptitle(f"{title}: {key}" + (f" at {fixed}" if fixed else "")
                 + f" ({n_seeds} seeds, band min-max)", fontsize=10)
    return _save(fig, path)


def contrast_name(selection: dict[str, list[str]]) -> str:
    parts = ["-".join([k, *v]) for k, v in selection.items()]
    return "contrast_" + "_".join(parts) + ".png"


__all__ = ["contrast", "contrast_name", "delta_vs_params", "dynamics_vs_params",
           "loss_vs_params", "parse_contrast", "scale_diagram", "text_colour"]


def _against_params(pts: Sequence[Point], grid: dict[str, list[Any]]) -> tuple[Any, ...]:
    """What both parameter-count figures share: the size axis a line runs along, the
    grouping axes, one panel per group, the figure, its axes and the colour cycle."""
    plt = pyplot()
    size, group = axes(grid)
    along = size[0] if size else next(k for k in grid if k != SEED)
    panels = _panels(pts, group)
    fig, axs = plt.subplots(1, len(panels), squeeze=False, figsize=(4.2 * len(panels), 3.3),
                            sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return along, group, panels, fig, axs, colors
