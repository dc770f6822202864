"""A sweep directory read back: each finished cell's entropy, trace and loss over training."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import InputError
from cvcore.record import RecordStore

#: Kernel-dynamics variables read back when a cell recorded them.
DYNAMICS = ("target_alignment", "kernel_distance_init", "kernel_velocity")


@dataclass
class Series:
    """One probe set's values over the recorded steps of one cell; ``dynamics`` holds the
    kernel-dynamics variables (:data:`DYNAMICS`) the cell recorded, NaN where missing."""

    step: NDArray[np.int64]
    entropy: NDArray[np.float64]
    trace: NDArray[np.float64]
    dynamics: dict[str, NDArray[np.float64]] = field(default_factory=dict)


@dataclass
class CellData:
    """A finished cell: its grid values, parameter count, losses and series per probe set."""

    id: str
    params: dict[str, Any]
    n_params: int
    step: NDArray[np.int64]
    loss: NDArray[np.float64]
    extras: list[dict[str, Any]]
    series: dict[str, Series] = field(default_factory=dict)

    @property
    def final_loss(self) -> float:
        return float(self.loss[-1]) if self.loss.size else math.nan

    def final_extra(self, key: str) -> float:
        """The last recorded value of one extra (NaN when never recorded).

        Raises:
            InputError: the value stored is not a number.
        """
        for extras in reversed(self.extras):
            if key in extras:
                value = extras[key]
                if value is None:
                    return math.nan
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InputError(f"cell {self.id}: expected the extra {key!r} to be a "
                                     f"number, got {type(value).__name__}")
                return float(value)
        return math.nan


@dataclass
class SweepData:
    """The finished cells of a sweep and the grid they come from."""

    root: Path
    grid: dict[str, list[Any]]
    cells: list[CellData]
    failed: list[dict[str, Any]]
    missing: list[str]


def read_cell(store_path: Path, params: dict[str, Any], n_params: int | None,
              cell_id: str) -> CellData:
    """One cell's record store as arrays (the summary value of each probe set)."""
    with RecordStore(store_path, create=False) as store:
        info = store.run(None)
        records = store.records(info.id)
    steps = np.asarray([r.step for r in records], dtype=np.int64)
    loss = np.asarray([math.nan if r.loss is None else r.loss for r in records], dtype=float)
    sets = sorted({v.probe_set for r in records for v in r.values})
    series = {}
    for name in sets:
        columns: dict[str, list[float]] = {"entropy": [], "trace": [],
                                           **{var: [] for var in DYNAMICS}}
        for r in records:
            for var, column in columns.items():
                hit = [v.value for v in r.values if v.probe_set == name and v.variable == var
                       and v.subset is None and v.label is None]
                column.append(hit[0] if hit else math.nan)
        dyn = {var: np.asarray(columns[var], dtype=float) for var in DYNAMICS
               if np.isfinite(np.asarray(columns[var], dtype=float)).any()}
        series[name] = Series(steps, np.asarray(columns["entropy"], dtype=float),
                              np.asarray(columns["trace"], dtype=float), dyn)
    count = n_params if n_params is not None else info.n_params
    if count is None:
        raise InputError(f"{store_path}: expected the model's parameter count in the store, "
                         f"got none")
    return CellData(cell_id, params, int(count), steps, loss, [dict(r.extras) for r in records],
                    series)


def load_sweep(root: str | Path) -> SweepData:
    """Every finished cell of a sweep directory (``cv sweep``'s ``--out``).

    Raises:
        InputError: not a sweep directory, or no finished cell in it.
    """
    from cvcore.sweep.run import load_sweep_config

    path = Path(root)
    config = load_sweep_config(path)
    cells: list[CellData] = []
    failed: list[dict[str, Any]] = []
    missing: list[str] = []
    for cell in config.cells():
        status_file = path / "cells" / f"{cell.id}.json"
        try:
            status = json.loads(status_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            missing.append(cell.id)
            continue
        if status.get("status") != "done":
            failed.append({"id": cell.id, "error": status.get("error")})
            continue
        cells.append(read_cell(path / "cells" / f"{cell.id}.db", cell.params,
                               status.get("n_params"), cell.id))
    if not cells:
        raise InputError(f"{path}: expected at least one finished cell, got none "
                         f"({len(failed)} failed, {len(missing)} not run)")
    return SweepData(path, config.grid, cells, failed, missing)
