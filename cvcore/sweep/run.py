"""Run a sweep: the checks, the directory, the cells still to do, the engine, progress,
Ctrl-C, a summary.

Everything a user can get wrong is checked before anything is created: the options, the
``--out`` folder, the grid's size and estimated cost, the data's sizes. Then the sweep
directory is created and locked, and the cells not yet done run on the engine.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cvcore.sweep import budget, engines
from cvcore.sweep.cell import (
    STATUS_DONE,
    STATUS_INTERRUPTED,
    StatusProblem,
    is_done,
    read_status,
    status_path,
    write_json,
)
from cvcore.sweep.config import Cell, ConfigError, SweepConfig, parse_config
from cvcore.sweep.directory import (
    CONFIG_NAME,
    SUMMARY_NAME,
    check_out,
    comparable,
    open_sweep_dir,
)
from cvcore.sweep.pool import sigint_ignored

ORDERS = ("largest", "grid")
__all__ = ["CONFIG_NAME", "SUMMARY_NAME", "SweepInterrupted", "comparable",
           "load_sweep_config", "read_summary", "run_sweep"]


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the sweep; its running cells are marked interrupted and
    ``sweep.json`` is written. ``str()`` is the one line to show."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


def _cost(config: SweepConfig, cell: Cell) -> float:
    """A rough cost of a cell for ordering (width² × depth × epochs when known)."""
    model, train, _ = config.resolve(cell)
    width, depth = model.get("width", 1), model.get("depth", 1)
    size = width * width * depth if isinstance(width, int) and isinstance(depth, int) else 1
    return float(size * max(train.epochs, 1))


def load_sweep_config(out: Path) -> SweepConfig:
    """The config a sweep directory was started with."""
    saved = out / CONFIG_NAME
    if not saved.is_file():
        raise ConfigError(f"{out}: expected a sweep directory (with {CONFIG_NAME}), got none")
    try:
        text = saved.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{saved}: expected a readable UTF-8 config, got {exc}") from None
    return parse_config(text, where=str(saved))


def _line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check_options(*, engine: str, workers: int, scheduler: str | None,
                  order: str) -> engines.SweepEngine:
    """Every option of ``run_sweep`` checked, before anything is created."""
    if engine not in tuple(e.value for e in engines.SweepEngine):
        raise ConfigError(f"expected --engine local or dask, got {engine!r}")
    chosen = engines.SweepEngine(engine)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"expected --workers a positive integer, got {workers}")
    if scheduler is not None and chosen is not engines.SweepEngine.dask:
        raise ConfigError(f"expected --scheduler only with --engine dask, got --engine "
                          f"{chosen.value}")
    engines.check_scheduler(scheduler)
    if order not in ORDERS:
        raise ConfigError(f"expected --order largest or grid, got {order!r}")
    return chosen


def _pending(config: SweepConfig, cells: Sequence[Cell], root: Path,
             say: Callable[[str], None]) -> list[Cell]:
    """The cells not done; a cell whose status file is unreadable is said and redone."""
    pending = []
    for cell in cells:
        status = read_status(root, cell) if root.is_dir() else None
        if isinstance(status, StatusProblem):
            say(f"cell {cell.id}: its status file {status_path(root, cell)} is {status}; "
                f"running it again")
        if not is_done(root, cell, status):
            pending.append(cell)
    return pending


def run_sweep(config: SweepConfig, out: str | Path, *, engine: str = "local",
              workers: int = 2, scheduler: str | None = None, order: str = "largest",
              allow_large: bool = False,
              progress: Callable[[str], None] | None = _line) -> dict[str, Any]:
    """Run every cell not yet done; a failed cell is reported and the others go on.

    ``order="largest"`` starts the largest cells (width² × depth × epochs) first, which
    keeps the workers busy to the end; ``"grid"`` keeps the file's order (small widths
    first in the examples), so that a sweep stopped early has whole rows of the grid.
    A sweep over :data:`budget.MAX_CELLS` cells or estimated over an hour is refused
    unless ``allow_large`` (``--allow-large``).

    Returns:
        The summary written to ``sweep.json``: cell counts, the failures with their
        errors, the engine and the wall time.

    Raises:
        SweepInterrupted: Ctrl-C; the running cells are stopped and marked interrupted
            and ``sweep.json`` says so.
    """
    root = Path(out)
    chosen = check_options(engine=engine, workers=workers, scheduler=scheduler, order=order)
    say = progress or (lambda _text: None)
    check_out(root)
    budget.check_count(config, allow_large=allow_large)
    split = budget.check_data(config)
    cells = config.cells()
    estimate = budget.check_cost(config, _pending(config, cells, root, lambda _t: None), split,
                                 workers=workers, allow_large=allow_large)
    lock = open_sweep_dir(config, root)
    try:
        return _run(config, root, cells, chosen, workers, scheduler, order, estimate, say)
    finally:
        lock.release()


def _run(config: SweepConfig, root: Path, cells: list[Cell], chosen: engines.SweepEngine,
         workers: int, scheduler: str | None, order: str, estimate: float,
         say: Callable[[str], None]) -> dict[str, Any]:
    pending = _pending(config, cells, root, say)
    done = len(cells) - len(pending)
    if order == "largest":  # largest first: no large cell left running alone at the end
        pending.sort(key=lambda c: -_cost(config, c))
    say(f"sweep {config.name}: {len(cells)} cells, {done} already done, {len(pending)} to run "
        f"on {chosen.value} ({workers} worker{'s' if workers != 1 else ''}"
        f"{', ' + scheduler if scheduler else ''}), estimated ~{budget.human(estimate)}")
    started = time.perf_counter()
    failed: list[dict[str, Any]] = []
    finished = 0
    runner = engines.make_runner(chosen, config, root, workers, scheduler)

    def summary(**extra: Any) -> dict[str, Any]:
        data = {"name": config.name, "cells": len(cells), "done": done, "failed": len(failed),
                "failures": failed, "ran": finished, "engine": chosen.value,
                "workers": workers, "scheduler": scheduler,
                "wall_seconds": time.perf_counter() - started, "finished": time.time(),
                **extra}
        write_json(root / SUMMARY_NAME, data)
        return data

    try:
        for status in runner.run(pending) if pending else ():
            finished += 1
            if status.get("status") == STATUS_DONE:
                done += 1
            else:
                failed.append({"id": status["id"], "error": status.get("error")})
            elapsed = time.perf_counter() - started
            left = len(pending) - finished
            eta = elapsed / finished * left
            word = "done" if status.get("status") == STATUS_DONE else "FAILED"
            detail = "" if word == "done" else f": {status.get('error')}"
            say(f"[{done + len(failed)}/{len(cells)}] {word} {status['id']} "
                f"({status.get('seconds', 0.0):.1f}s){detail} | done {done}, failed "
                f"{len(failed)}, running {min(workers, left)}, left {left}, "
                f"~{budget.human(eta)} to go")
    except KeyboardInterrupt:
        with sigint_ignored():  # a second Ctrl-C does not cut the clean-up short
            stopped = [c for c in runner.interrupt() if _mark_interrupted(root, c)]
            data = summary(interrupted=[c.id for c in stopped], status="interrupted")
        raise SweepInterrupted(
            f"interrupted: {len(stopped)} running cell{'s' if len(stopped) != 1 else ''} "
            f"stopped and marked interrupted, {done} done kept in {root}; run the same "
            f"command again to resume", data) from None
    finally:
        runner.close()  # no worker outlives the sweep, whatever ended it
    data = summary(status="finished")
    say(f"sweep {config.name}: {done} done, {len(failed)} failed, {finished} run in "
        f"{budget.human(data['wall_seconds'])}; results in {root}")
    return data


def _mark_interrupted(root: Path, cell: Cell) -> bool:
    """Write the cell's status as interrupted unless it finished; True if written."""
    status = read_status(root, cell)
    if is_done(root, cell, status):
        return False
    base = status if isinstance(status, dict) else {}
    write_json(status_path(root, cell), {
        **base, "id": cell.id, "index": cell.index, "params": cell.params,
        "status": STATUS_INTERRUPTED, "error": "interrupted (Ctrl-C) before it finished"})
    return True


def read_summary(out: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((out / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data
