"""Figures of recorded runs: entropy, trace and loss against step, or the phase plots.

matplotlib is an optional extra (``pip install 'cvcore[plot]'``), imported only here and
only when a figure is drawn. Runs are told apart by colour, probe sets by line style
(train solid, test dashed); subsets give mean ± std bands.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvcore.errors import InputError
from cvcore.files import atomic_output
from cvcore.imports import require
from cvcore.record.store import Record, RunInfo
from cvcore.record.summary import groups, series

STYLES = {"train": "-", "probe": "-", "test": "--", "val": ":", "validation": ":"}
OTHER_STYLES = ("-.", ":", (0, (5, 1)), (0, (1, 1)))


@dataclass(frozen=True)
class PlotRun:
    """One run to draw: its legend label, metadata and records."""

    label: str
    info: RunInfo
    records: Sequence[Record]


def _pyplot() -> Any:
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(probe_set: str, order: list[str]) -> Any:
    if probe_set in STYLES:
        return STYLES[probe_set]
    if probe_set not in order:
        order.append(probe_set)
    return OTHER_STYLES[order.index(probe_set) % len(OTHER_STYLES)]


def _loss(records: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r.step, r.loss) for r in records if r.loss is not None]
    arr = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def plot_runs(runs: Sequence[PlotRun], out: Path, *, phase: bool = False,
              tick: Callable[[], None] | None = None) -> Path:
    """Draw the runs into ``out`` (PNG, PDF or SVG by its suffix), written atomically.

    Args:
        runs: the runs to overlay.
        out: the figure's path.
        phase: the paper's phase plots (entropy and ln trace against ln loss) instead of
            entropy, trace and loss against step.
        tick: called once per run drawn (a progress bar).

    Raises:
        InputError: nothing to draw (no entropy or trace recorded, or no loss for
            ``phase``).
        MissingFrameworkError: matplotlib is not installed.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if phase else 3, figsize=(11 if phase else 15, 4.2),
                             constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = 0
    order: list[str] = []
    for index, run in enumerate(runs):
        colour = colours[index % len(colours)]
        sets = [ps for ps, label in groups(run.records) if label is None]
        for position, probe_set in enumerate(sets):
            # one run: a colour per probe set; several: a colour per run, a style per set
            if len(runs) == 1:
                colour = colours[position % len(colours)]
                name = probe_set
            else:
                name = run.label + (f" · {probe_set}" if len(sets) > 1 else "")
            style = _style(probe_set, order)
            ent = series(run.records, probe_set, None, "entropy")
            tr = series(run.records, probe_set, None, "trace")
            if phase:
                drawn += _phase(axes, ent, tr, colour, style, name)
            else:
                drawn += _band(axes[0], ent, colour, style, name, log=False)
                drawn += _band(axes[1], tr, colour, style, name, log=True)
        if not phase:
            steps, loss = _loss(run.records)
            if loss.size:
                axes[2].plot(steps, loss, color="black" if len(runs) == 1 else colours[
                    index % len(colours)], marker="." if loss.size < 30 else None,
                    label=run.label)
        if tick is not None:
            tick()
    if not drawn:
        plt.close(fig)
        raise InputError("expected runs with entropy or trace records"
                         + (" and a loss (record(step, model, loss=...))" if phase else "")
                         + ", got none to plot")
    if phase:
        axes[0].set(xlabel="ln loss", ylabel="entropy S", title="entropy against ln loss")
        axes[1].set(xlabel="ln loss", ylabel="ln Tr K", title="ln trace against ln loss")
    else:
        axes[0].set(xlabel="step", ylabel="entropy S", title="NTK entropy")
        axes[1].set(xlabel="step", ylabel="Tr K", title="NTK trace", yscale="log")
        axes[2].set(xlabel="step", ylabel="loss", title="training loss")
        if axes[2].lines:
            axes[2].set_yscale("log" if _positive(axes[2]) else "linear")
            axes[2].legend(fontsize="small")
        else:
            axes[2].text(0.5, 0.5, "no loss recorded", ha="center", va="center",
                         transform=axes[2].transAxes, color="grey")
    for ax in axes[:2]:
        if ax.lines:
            ax.legend(fontsize="small")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        if not phase:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    kernels = sorted({r.info.kernel for r in runs})
    title = f"collective variables ({', '.join(kernels)} kernel)"
    if len(runs) == 1:
        title = f"{runs[0].label}: {title}"
    fig.suptitle(title, fontsize="medium")
    out = Path(out)
    try:
        with atomic_output(out, suffix=out.suffix or ".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out


def _positive(ax: Any) -> bool:
    return all(np.all(np.asarray(line.get_ydata(), dtype=float) > 0) for line in ax.lines)


def _band(ax: Any, s: dict[str, np.ndarray], colour: str, style: Any, name: str,
          *, log: bool) -> int:
    if s["value"].size == 0:
        return 0
    x, y, std = s["step"], s["value"], s["std"]
    ax.plot(x, y, color=colour, linestyle=style, label=name,
            marker="." if y.size < 30 else None)
    if np.isfinite(std).any():
        lo, hi = y - std, y + std
        if log:
            lo = np.where(lo > 0, lo, np.nan)
        ax.fill_between(x, lo, hi, color=colour, alpha=0.18, linewidth=0)
    return 1


def _phase(axes: Any, ent: dict[str, np.ndarray], tr: dict[str, np.ndarray], colour: str,
           style: Any, name: str) -> int:
    drawn = 0
    for ax, s, transform in ((axes[0], ent, lambda v: v), (axes[1], tr, np.log)):
        ok = np.isfinite(s["loss"]) & (s["loss"] > 0) & np.isfinite(s["value"])
        if s["value"].size == 0 or not ok.any():
            continue
        ax.plot(np.log(s["loss"][ok]), transform(s["value"][ok]), color=colour,
                linestyle=style, marker=".", label=name)
        drawn += 1
    return drawn
