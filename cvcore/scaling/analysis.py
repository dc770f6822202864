"""The scale diagram's numbers: ΔS per cell, means over seeds, sign changes along
parameter count with a bootstrap over seeds, and fits (power law, ΔS against ln P).

Conventions (``docs/sweep.md``, ``cv scaling``): ``ΔS = S(end) − S(start)`` with start the first record
(before any update) and end the last; ``ΔS_min = S(end) − min S`` with the step of the
minimum; ``Δ ln Tr = ln Tr(end) − ln Tr(start)``. A change smaller than two standard
errors over seeds is "within noise".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import InputError
from cvcore.scaling.load import CellData, SweepData

SEED = "seed"
#: Per-cell metrics, in the order the summary lists them.
METRICS = ("delta_S", "delta_S_min", "min_step", "S_start", "S_end", "delta_ln_trace",
           "final_loss", "final_test_loss", "final_test_accuracy", "alignment_start",
           "alignment_end", "delta_alignment", "kernel_distance", "fastest_step")
#: The kernel-dynamics metrics (NaN for cells that did not record them).
DYNAMIC_METRICS = ("alignment_start", "alignment_end", "delta_alignment", "kernel_distance",
                   "fastest_step")


def cell_metrics(cell: CellData, probe_set: str) -> dict[str, float]:
    """ΔS (end − start), ΔS_min (end − min) and the step of the minimum, Δ ln Tr and the
    final losses of one cell, on one probe set."""
    if probe_set not in cell.series:
        raise InputError(f"expected probe set {probe_set!r} in cell {cell.id}, got "
                         f"{sorted(cell.series)}")
    s = cell.series[probe_set]
    ok = np.isfinite(s.entropy)
    if ok.sum() < 2:
        raise InputError(f"expected at least two recorded entropies in cell {cell.id}, got "
                         f"{int(ok.sum())}")
    entropy, steps, trace = s.entropy[ok], s.step[ok], s.trace[ok]
    i_min = int(np.argmin(entropy))
    with np.errstate(divide="ignore", invalid="ignore"):
        dlt = float(np.log(trace[-1]) - np.log(trace[0])) if trace.size else math.nan
    return {**dynamic_metrics(s.step, s.dynamics),
            "delta_S": float(entropy[-1] - entropy[0]),
            "delta_S_min": float(entropy[-1] - entropy[i_min]),
            "min_step": float(steps[i_min]), "S_start": float(entropy[0]),
            "S_end": float(entropy[-1]), "delta_ln_trace": dlt,
            "final_loss": cell.final_loss, "final_test_loss": cell.final_extra("test_loss"),
            "final_test_accuracy": cell.final_extra("test_accuracy")}


def dynamic_metrics(steps: NDArray[np.int64], dyn: dict[str, NDArray[np.float64]]
                    ) -> dict[str, float]:
    """The target alignment at the first and last record and its change, the kernel's
    distance from its first record at the last (``kernel_distance_init``), and the step of
    the largest ``kernel_velocity``; NaN for what the cell did not record."""
    out = dict.fromkeys(DYNAMIC_METRICS, math.nan)
    a = dyn.get("target_alignment")
    if a is not None and np.isfinite(a).sum() >= 1:
        ok = a[np.isfinite(a)]
        out.update(alignment_start=float(ok[0]), alignment_end=float(ok[-1]),
                   delta_alignment=float(ok[-1] - ok[0]))
    d = dyn.get("kernel_distance_init")
    if d is not None and np.isfinite(d).any():
        out["kernel_distance"] = float(d[np.isfinite(d)][-1])
    v = dyn.get("kernel_velocity")
    if v is not None and np.isfinite(v).any():
        out["fastest_step"] = float(steps[int(np.nanargmax(v))])
    return out


@dataclass
class Point:
    """One grid point with the seeds pooled: per-seed values and their mean and spread."""

    params: dict[str, Any]
    n_params: float
    seeds: list[Any]
    values: dict[str, NDArray[np.float64]]

    def mean(self, metric: str) -> float:
        v = self.values[metric]
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else math.nan

    def std(self, metric: str) -> float:
        v = self.values[metric]
        v = v[np.isfinite(v)]
        return float(v.std(ddof=1)) if v.size > 1 else math.nan

    def sem(self, metric: str) -> float:
        v = self.values[metric]
        n = int(np.isfinite(v).sum())
        return self.std(metric) / math.sqrt(n) if n > 1 else math.nan

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"params": self.params, "n_params": self.n_params,
                               "seeds": self.seeds}
        for m in self.values:
            out[m] = {"mean": _num(self.mean(m)), "std": _num(self.std(m)),
                      "sem": _num(self.sem(m)),
                      "per_seed": [_num(float(v)) for v in self.values[m]]}
        return out


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def points(cells: Sequence[CellData], probe_set: str) -> list[Point]:
    """The grid points (every grid key but ``seed``), in the order first seen."""
    groups: dict[str, list[CellData]] = {}
    for c in cells:
        key = repr(sorted((k, repr(v)) for k, v in c.params.items() if k != SEED))
        groups.setdefault(key, []).append(c)
    out = []
    for members in groups.values():
        rows = [cell_metrics(c, probe_set) for c in members]
        params = {k: v for k, v in members[0].params.items() if k != SEED}
        out.append(Point(params, float(np.mean([c.n_params for c in members])),
                         [c.params.get(SEED, 0) for c in members],
                         {m: np.asarray([r[m] for r in rows], dtype=float) for m in METRICS}))
    return out


def axes(grid: dict[str, list[Any]]) -> tuple[list[str], list[str]]:
    """The size axes (numeric grid keys but seed, at most two: the heat map's x and y) and
    the group keys (the others: one panel per combination)."""
    numeric = [k for k, v in grid.items() if k != SEED and len(v) > 1
               and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)]
    size = numeric[:2]
    group = [k for k in grid if k != SEED and k not in size and len(grid[k]) > 1]
    return size, group


def lines(pts: Sequence[Point], along: str) -> list[tuple[dict[str, Any], list[Point]]]:
    """Points sharing every key but ``along``, each set sorted by parameter count."""
    out: dict[str, tuple[dict[str, Any], list[Point]]] = {}
    for p in pts:
        fixed = {k: v for k, v in p.params.items() if k != along}
        key = repr(sorted((k, repr(v)) for k, v in fixed.items()))
        out.setdefault(key, (fixed, []))[1].append(p)
    return [(fixed, sorted(ps, key=lambda p: p.n_params)) for fixed, ps in out.values()]


def _crossing(log_p: NDArray[np.float64], y: NDArray[np.float64], i: int) -> float:
    """log10 P where the straight line between points i and i+1 crosses zero."""
    y0, y1 = y[i], y[i + 1]
    if y1 == y0:
        return float((log_p[i] + log_p[i + 1]) / 2)
    return float(log_p[i] + (0.0 - y0) / (y1 - y0) * (log_p[i + 1] - log_p[i]))


def _changes(y: NDArray[np.float64]) -> list[int]:
    """Indices i where the sign changes between y[i] and y[i+1] (zeros skipped over)."""
    s = np.sign(y)
    out = []
    for i in range(len(y) - 1):
        if s[i] != 0 and s[i + 1] != 0 and s[i] != s[i + 1]:
            out.append(i)
    return out


def sign_changes(line: Sequence[Point], metric: str = "delta_S", *, n_boot: int = 1000,
                 seed: int = 0) -> list[dict[str, Any]]:
    """Every sign change of the seed-mean ``metric`` along a line of points, either way.

    Each change is located by linear interpolation in log10 P between the two points it
    falls between. Its uncertainty comes from ``n_boot`` bootstrap resamples of the seeds
    (each point's seeds drawn with replacement): ``support`` is the fraction of resamples
    that change sign in the same direction between the same two points, and ``log10_P_std``
    and the 95 % interval describe the crossing among those resamples. ``within_noise``
    says that a point on either side is within two standard errors of zero.
    """
    if len(line) < 2:
        return []
    log_p = np.log10(np.asarray([p.n_params for p in line], dtype=float))
    per_seed = [p.values[metric][np.isfinite(p.values[metric])] for p in line]
    if any(v.size == 0 for v in per_seed):
        return []
    mean = np.asarray([v.mean() for v in per_seed])
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, len(line)))
    for j, v in enumerate(per_seed):
        boot[:, j] = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    out = []
    for i in _changes(mean):
        direction = "compression→structure" if mean[i] < 0 < mean[i + 1] else \
            "structure→compression"
        same = np.sign(boot[:, i]) == np.sign(mean[i])
        same &= np.sign(boot[:, i + 1]) == np.sign(mean[i + 1])
        crossings = np.asarray([_crossing(log_p, b, i) for b in boot[same]])
        sems = [line[k].sem(metric) for k in (i, i + 1)]
        noisy = any(not math.isfinite(s) or abs(mean[k]) < 2 * s
                    for k, s in zip((i, i + 1), sems, strict=True))
        at = _crossing(log_p, mean, i)
        entry: dict[str, Any] = {
            "between": [line[i].params, line[i + 1].params],
            "n_params_between": [line[i].n_params, line[i + 1].n_params],
            "direction": direction, "log10_P": at, "P": 10 ** at,
            "support": float(same.mean()),
            "log10_P_std": float(crossings.std(ddof=1)) if crossings.size > 1 else None,
            "P_95": ([10 ** float(np.percentile(crossings, 2.5)),
                      10 ** float(np.percentile(crossings, 97.5))] if crossings.size else None),
            "values": [float(mean[i]), float(mean[i + 1])], "sem": [_num(s) for s in sems],
            "within_noise": bool(noisy), "seeds": [int(v.size) for v in per_seed[i:i + 2]]}
        out.append(entry)
    return out


def linear_fit(x: NDArray[np.float64], y: NDArray[np.float64]) -> dict[str, float | None]:
    """Least squares ``y = a + b x``: slope, intercept, their standard errors, R²."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = x.size
    if n < 2 or np.ptp(x) == 0:
        return {"slope": None, "slope_se": None, "intercept": None, "intercept_se": None,
                "r2": None, "n": n}
    design = np.column_stack([np.ones(n), x])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    ss_res, ss_tot = float(resid @ resid), float(((y - y.mean()) ** 2).sum())
    if n > 2:
        cov = ss_res / (n - 2) * np.linalg.inv(design.T @ design)
        se = np.sqrt(np.diag(cov))
    else:
        se = np.array([math.nan, math.nan])
    return {"slope": float(coef[1]), "slope_se": _num(float(se[1])),
            "intercept": float(coef[0]), "intercept_se": _num(float(se[0])),
            "r2": float(1 - ss_res / ss_tot) if ss_tot > 0 else None, "n": int(n)}


def power_law(line: Sequence[Point], metric: str = "final_loss") -> dict[str, Any]:
    """``metric = A · P^α`` fitted by least squares on log10 of every seed's value:
    ``exponent`` α ± ``exponent_se``, ``prefactor`` A."""
    x = np.concatenate([np.full(p.values[metric].size, math.log10(p.n_params)) for p in line])
    y = np.concatenate([p.values[metric] for p in line])
    with np.errstate(divide="ignore", invalid="ignore"):
        ly = np.where(y > 0, np.log10(np.where(y > 0, y, 1.0)), np.nan)
    fit = linear_fit(x, ly)
    return {"exponent": fit["slope"], "exponent_se": fit["slope_se"],
            "prefactor": None if fit["intercept"] is None else 10 ** fit["intercept"],
            "r2": fit["r2"], "n": fit["n"]}


def monotone_runs(y: Sequence[float], min_points: int = 3) -> list[tuple[int, int]]:
    """Maximal index ranges [i, j] (inclusive) over which y never changes direction."""
    runs: list[tuple[int, int]] = []
    n, start = len(y), 0
    while start < n - 1:
        end, direction = start + 1, np.sign(y[start + 1] - y[start])
        while end + 1 < n:
            d = np.sign(y[end + 1] - y[end])
            if d != 0 and direction != 0 and d != direction:
                break
            direction = direction or d
            end += 1
        if end - start + 1 >= min_points:
            runs.append((start, end))
        start = end
    return runs


def log_fits(line: Sequence[Point], metric: str = "delta_S") -> list[dict[str, Any]]:
    """``metric = a + b ln P`` on each monotone stretch (three or more points) of a line."""
    y = [p.mean(metric) for p in line]
    out = []
    for i, j in monotone_runs(y):
        part = line[i:j + 1]
        x = np.concatenate([np.full(p.values[metric].size, math.log(p.n_params)) for p in part])
        v = np.concatenate([p.values[metric] for p in part])
        fit = linear_fit(x, v)
        out.append({"from": part[0].params, "to": part[-1].params,
                    "n_params": [part[0].n_params, part[-1].n_params],
                    "direction": "increasing" if y[j] > y[i] else "decreasing",
                    "slope_per_ln_P": fit["slope"], "slope_se": fit["slope_se"],
                    "intercept": fit["intercept"], "r2": fit["r2"], "n": fit["n"]})
    return out


def analyse(sweep: SweepData, *, probe_set: str = "train", n_boot: int = 1000,
            seed: int = 0) -> dict[str, Any]:
    """Everything ``cv scaling`` reports, as JSON-ready structures."""
    pts = points(sweep.cells, probe_set)
    size, group = axes(sweep.grid)
    along_keys = size or [k for k in sweep.grid if k != SEED][:1]
    changes, power, logs = [], [], []
    for along in along_keys:
        for fixed, line in lines(pts, along):
            if len(line) < 2:
                continue
            for ch in sign_changes(line, n_boot=n_boot, seed=seed):
                changes.append({"along": along, "fixed": fixed, **ch})
            power.append({"along": along, "fixed": fixed, **power_law(line)})
            for fit in log_fits(line):
                logs.append({"along": along, "fixed": fixed, **fit})
    pooled = []
    for fixed, line in lines(pts, "__all__") if not group else _group_lines(pts, group):
        pooled.append({"fixed": fixed, **power_law(line)})
    seeds = sorted({c.params.get(SEED, 0) for c in sweep.cells}, key=repr)
    return {"sweep": str(sweep.root), "probe_set": probe_set,
            "endpoints": {"delta_S": "S(last record) - S(first record, before training)",
                          "delta_S_min": "S(last record) - min over records of S",
                          "delta_ln_trace": "ln Tr(last) - ln Tr(first)"},
            "size_axes": size, "group_axes": group, "seeds": seeds,
            "cells": {"done": len(sweep.cells), "failed": sweep.failed,
                      "not_run": sweep.missing},
            "points": [p.to_dict() for p in pts], "sign_changes": changes,
            "loss_power_law": power, "loss_power_law_pooled": pooled,
            "delta_S_vs_ln_P": logs}


def _group_lines(pts: Sequence[Point], group: Sequence[str]) -> list[tuple[dict[str, Any],
                                                                          list[Point]]]:
    out: dict[str, tuple[dict[str, Any], list[Point]]] = {}
    for p in pts:
        fixed = {k: p.params[k] for k in group if k in p.params}
        out.setdefault(repr(sorted(fixed.items())), (fixed, []))[1].append(p)
    return [(f, sorted(ps, key=lambda p: p.n_params)) for f, ps in out.values()]
