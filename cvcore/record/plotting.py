"""Figures of recorded runs: entropy, trace, loss, the user's logged curves, the kernel's
alignment and motion, and its spectrum over time; or the phase plots.

matplotlib is an optional extra (``pip install 'cvcore[plot]'``), imported only here and
only when a figure is drawn. Runs are told apart by colour, probe sets by line style
(train solid, test dashed); subsets give mean ± std bands. Runs that differ only in their
seed (:func:`cvcore.record.compare.group_runs`) are drawn as one line, the mean over seeds,
with a ± std band over seeds. When the overlaid runs' probes have different sizes N, the
trace panel shows ``Tr K / N`` (the trace grows with N) and the legend names each N.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cvcore.errors import InputError
from cvcore.files import atomic_output
from cvcore.imports import require
from cvcore.record.compare import LoadedRun, RunGroup, group_runs
from cvcore.record.store import Record, RunInfo
from cvcore.record.summary import groups, series

#: Steps, values and a band (NaN where none) of one curve.
Curve = tuple[np.ndarray, np.ndarray, np.ndarray]

STYLES = {"train": "-", "probe": "-", "test": "--", "val": ":", "validation": ":"}
OTHER_STYLES = ("-.", ":", (0, (5, 1)), (0, (1, 1)))
#: Extras that are bookkeeping, not the user's curves.
NOT_CURVES = ("source", "timesteps", "cvcore_note")
#: At most this many panels of logged extras (accuracy, reward, ...).
MAX_EXTRAS = 3
#: Panels of the kernel's dynamics, when recorded: variable, title, log scale.
DYNAMIC_PANELS = (("target_alignment", "target alignment A(K, Y)", False),
                  ("residual_alignment", "residual alignment rᵀKr / (‖r‖² Tr K)", False),
                  ("kernel_velocity", "kernel velocity (distance per step)", True),
                  ("kernel_distance_init", "kernel distance to the first record", False))


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


def probe_size(info: RunInfo, probe_set: str) -> int | None:
    """The samples one recorded kernel of a probe set had: the subset size with subsets,
    else the probe set's size (``None`` when the run does not say)."""
    meta = info.probe_sets.get(probe_set)
    if not isinstance(meta, dict):
        return None
    subsets = meta.get("subsets")
    n = subsets[1] if isinstance(subsets, (list, tuple)) and len(subsets) == 2 else \
        meta.get("n_samples")
    return int(n) if isinstance(n, (int, float)) else None


def logged_keys(records: Sequence[Record]) -> list[str]:
    """The numeric extras (the user's logged curves), in first-seen order."""
    seen: dict[str, None] = {}
    for rec in records:
        for k, v in rec.extras.items():
            if k not in NOT_CURVES and isinstance(v, (int, float)) and not isinstance(v, bool):
                seen.setdefault(k, None)
    return list(seen)


def logged(records: Sequence[Record], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of one logged extra (``loss`` is the record's loss)."""
    pairs = []
    for r in records:
        v = r.loss if key == "loss" else r.extras.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            pairs.append((r.step, float(v)))
    arr = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
    return arr[:, 0], arr[:, 1]


def pooled(members: Sequence[Sequence[Record]], get: Callable[[Sequence[Record]], Curve]
           ) -> Curve:
    """Steps, value and band of one curve; over several seeds: the mean and the std
    (``ddof=1``) over seeds at the steps every seed recorded.

    ``get(records)`` returns steps, values and a per-record band (NaN for none).
    """
    curves = [get(m) for m in members]
    if len(curves) == 1:
        return curves[0]
    common = sorted(set.intersection(*(set(c[0].tolist()) for c in curves)))
    if not common:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    at = np.asarray(common, dtype=np.float64)
    stack = np.stack([c[1][np.searchsorted(c[0], at)] for c in curves])
    return at, stack.mean(axis=0), stack.std(axis=0, ddof=1)


def _variable(probe_set: str, variable: str, scale: float = 1.0
              ) -> Callable[[Sequence[Record]], Curve]:
    def get(records: Sequence[Record]) -> Curve:
        s = series(records, probe_set, None, variable)
        order = np.argsort(s["step"], kind="stable")
        return (s["step"][order].astype(np.float64), s["value"][order] / scale,
                s["std"][order] / scale)
    return get


def _logged(key: str) -> Callable[[Sequence[Record]], Curve]:
    def get(records: Sequence[Record]) -> Curve:
        x, y = logged(records, key)
        order = np.argsort(x, kind="stable")
        return x[order], y[order], np.full(y.size, np.nan)
    return get


def _panel_names(runs: Sequence[PlotRun]) -> tuple[list[str], list[tuple[str, str, bool]]]:
    extras: dict[str, None] = {}
    for run in runs:
        for key in logged_keys(run.records):
            extras.setdefault(key, None)
    dyn = [p for p in DYNAMIC_PANELS if any(
        series(run.records, ps, None, p[0])["value"].size
        for run in runs for ps, label in groups(run.records) if label is None)]
    return list(extras)[:MAX_EXTRAS], dyn


def _spectrum(runs: Sequence[PlotRun]) -> tuple[str, str, np.ndarray, np.ndarray] | None:
    """The first run's first probe set with ``top_eigenvalues`` arrays: its label, probe
    set, steps and the (records × k) eigenvalues (NaN-padded)."""
    for run in runs:
        for ps, label in groups(run.records):
            if label is not None:
                continue
            rows, steps = [], []
            for rec in run.records:
                try:
                    rows.append(rec.array("top_eigenvalues", ps))
                except (KeyError, AttributeError):
                    continue
                steps.append(rec.step)
            if rows:
                k = max(r.size for r in rows)
                grid = np.full((len(rows), k), np.nan)
                for i, r in enumerate(rows):
                    grid[i, :r.size] = r
                return run.label, ps, np.asarray(steps, dtype=np.float64), grid
    return None


def plot_runs(runs: Sequence[PlotRun], out: Path, *, phase: bool = False,
              tick: Callable[[], None] | None = None) -> Path:
    """Draw the runs into ``out`` (PNG, PDF or SVG by its suffix), written atomically.

    Args:
        runs: the runs to overlay (seeds of one experiment are pooled).
        out: the figure's path.
        phase: the paper's phase plots (entropy and ln trace against ln loss) instead of
            the curves against step.
        tick: called once per run drawn (a progress bar).

    Raises:
        InputError: nothing to draw (no entropy or trace recorded, or no loss for
            ``phase``).
        MissingFrameworkError: matplotlib is not installed.
    """
    plt = _pyplot()
    if phase:
        return _phase_figure(plt, runs, out, tick)
    extras, dyn = _panel_names(runs)
    spectrum = _spectrum(runs)
    names = ["entropy", "trace", "loss", *extras, *(d[0] for d in dyn)]
    if spectrum is not None:
        names.append("spectrum")
    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows + 0.8),
                             squeeze=False, layout="constrained")
    axes = dict(zip(names, grid.flat))
    for ax in list(grid.flat)[len(names):]:
        ax.set_visible(False)
    loaded = [LoadedRun(r.label, r.info, r.records) for r in runs]
    seed_groups = group_runs(loaded)
    if len(seed_groups) == 1 and len(seed_groups[0].runs) == 1:
        seed_groups[0].label = runs[0].label
    sizes = {probe_size(r.info, ps) for r in runs for ps, lab in groups(r.records)
             if lab is None}
    per_sample = len(sizes) > 1 and None not in sizes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn, order = 0, list[str]()
    for index, group in enumerate(seed_groups):
        drawn += _draw_group(group, index, len(seed_groups), axes, colours, order,
                             per_sample, sizes, extras, dyn)
        if tick is not None:
            for _ in group.runs:
                tick()
    if not drawn:
        plt.close(fig)
        raise InputError("expected runs with entropy or trace records, got none to plot")
    axes["entropy"].set(xlabel="step", ylabel="entropy S", title="NTK entropy")
    axes["trace"].set(xlabel="step", yscale="log",
                      ylabel="Tr K / N" if per_sample else "Tr K",
                      title="NTK trace per probe sample (probe sizes differ)" if per_sample
                      else "NTK trace")
    axes["loss"].set(xlabel="step", ylabel="loss", title="training loss")
    for key in extras:
        axes[key].set(xlabel="step", ylabel=key, title=f"logged: {key}")
    for var, title, log in dyn:
        axes[var].set(xlabel="step", ylabel=var, title=title)
        if log and _positive(axes[var]):
            axes[var].set_yscale("log")
    for key in ("loss", *extras):
        ax = axes[key]
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {key} recorded", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        elif key == "loss" and _positive(ax):
            ax.set_yscale("log")
    if spectrum is not None:
        _draw_spectrum(fig, axes["spectrum"], spectrum)
    from matplotlib.ticker import MaxNLocator

    for name, ax in axes.items():
        if name == "spectrum":
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            continue
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = axes["entropy"].get_legend_handles_labels()
    if handles:  # one legend for the figure, below the panels, off every curve
        fig.legend(handles, labels, loc="outside lower center", fontsize="small",
                   ncols=min(4, len(labels)), frameon=False)
    kernels = sorted({r.info.kernel for r in runs})
    title = f"collective variables ({', '.join(kernels)} kernel)"
    if len(runs) == 1:
        title = f"{runs[0].label}: {title}"
    fig.suptitle(title, fontsize="medium")
    return _save(plt, fig, out)


def _draw_group(group: RunGroup, index: int, n_groups: int, axes: dict[str, Any],
                colours: list[str], order: list[str], per_sample: bool, sizes: set[Any],
                extras: list[str], dyn: Sequence[tuple[str, str, bool]]) -> int:
    members = [r.records for r in group.runs]
    info = group.runs[0].info
    sets = [ps for ps, label in groups(members[0]) if label is None]
    seeds = len(members) > 1
    drawn = 0
    colour = colours[index % len(colours)]
    for position, probe_set in enumerate(sets):
        if n_groups == 1:
            colour = colours[position % len(colours)]
            name = probe_set
        else:
            name = group.label + (f" · {probe_set}" if len(sets) > 1 else "")
        n = probe_size(info, probe_set)
        if len(sizes) > 1 and n is not None:
            name += f" (N={n})"
        if seeds:
            name += " (mean ± std over seeds)"
        style = _style(probe_set, order)
        drawn += _band(axes["entropy"], pooled(members, _variable(probe_set, "entropy")),
                       colour, style, name, log=False)
        scale = float(n) if per_sample and n else 1.0
        drawn += _band(axes["trace"], pooled(members, _variable(probe_set, "trace", scale)),
                       colour, style, name, log=True)
        for var, _title, log in dyn:
            _band(axes[var], pooled(members, _variable(probe_set, var)), colour, style, name,
                  log=log)
    for key in ("loss", *extras):
        curve = pooled(members, _logged(key))
        _band(axes[key], curve, "black" if n_groups == 1 else colour, "-", group.label,
              log=False)
    return drawn


def _draw_spectrum(fig: Any, ax: Any, spectrum: tuple[str, str, np.ndarray, np.ndarray]
                   ) -> None:
    label, probe_set, steps, values = spectrum
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(values > 0, np.log10(values), np.nan)
    k = values.shape[1]
    edges = np.concatenate([[steps[0] - 0.5], (steps[1:] + steps[:-1]) / 2,
                            [steps[-1] + 0.5]]) if steps.size > 1 else \
        np.asarray([steps[0] - 0.5, steps[0] + 0.5])
    mesh = ax.pcolormesh(edges, np.arange(k + 1) + 0.5, logs.T, cmap="viridis",
                         shading="flat")
    ax.set(xlabel="step", ylabel="eigenvalue index i", ylim=(k + 0.5, 0.5),
           title=f"top eigenvalues, {probe_set} ({label})")
    bar = fig.colorbar(mesh, ax=ax)
    bar.set_label("log10 λ_i")


def _save(plt: Any, fig: Any, out: Path) -> Path:
    out = Path(out)
    try:
        with atomic_output(out, suffix=out.suffix or ".png") as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return out


def _positive(ax: Any) -> bool:
    return bool(ax.lines) and all(
        np.all(np.asarray(line.get_ydata(), dtype=float)[np.isfinite(
            np.asarray(line.get_ydata(), dtype=float))] > 0) for line in ax.lines)


def _band(ax: Any, curve: Curve, colour: str, style: Any, name: str,
          *, log: bool) -> int:
    x, y, std = curve
    if y.size == 0 or not np.isfinite(y).any():
        return 0
    ax.plot(x, y, color=colour, linestyle=style, label=name,
            marker="." if y.size < 30 else None)
    if np.isfinite(std).any():
        lo, hi = y - std, y + std
        if log:
            lo = np.where(lo > 0, lo, np.nan)
        ax.fill_between(x, lo, hi, color=colour, alpha=0.18, linewidth=0)
    return 1


def _phase_figure(plt: Any, runs: Sequence[PlotRun], out: Path,
                  tick: Callable[[], None] | None) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn, order = 0, list[str]()
    for index, run in enumerate(runs):
        sets = [ps for ps, label in groups(run.records) if label is None]
        for position, probe_set in enumerate(sets):
            colour = colours[(position if len(runs) == 1 else index) % len(colours)]
            name = probe_set if len(runs) == 1 else run.label + (
                f" · {probe_set}" if len(sets) > 1 else "")
            style = _style(probe_set, order)
            drawn += _phase(axes, series(run.records, probe_set, None, "entropy"),
                            series(run.records, probe_set, None, "trace"), colour, style, name)
        if tick is not None:
            tick()
    if not drawn:
        plt.close(fig)
        raise InputError("expected runs with entropy or trace records and a loss "
                         "(record(step, model, loss=...)), got none to plot")
    axes[0].set(xlabel="ln loss", ylabel="entropy S", title="entropy against ln loss")
    axes[1].set(xlabel="ln loss", ylabel="ln Tr K", title="ln trace against ln loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", fontsize="small",
                   ncols=min(4, len(labels)), frameon=False)
    kernels = sorted({r.info.kernel for r in runs})
    title = f"phase plots ({', '.join(kernels)} kernel)"
    fig.suptitle(f"{runs[0].label}: {title}" if len(runs) == 1 else title, fontsize="medium")
    return _save(plt, fig, out)


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
