"""Run a sweep: the directory, the cells still to do, the engine, progress, a summary."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cvcore.sweep import engines
from cvcore.sweep.cell import STATUS_DONE, read_status, store_path, write_json
from cvcore.sweep.config import Cell, ConfigError, SweepConfig, parse_config

CONFIG_NAME = "sweep.toml"
SUMMARY_NAME = "sweep.json"


def prepare(config: SweepConfig, out: Path) -> None:
    """Create the sweep directory, or check that it holds the same config."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "cells").mkdir(exist_ok=True)
    saved = out / CONFIG_NAME
    if saved.exists():
        old = parse_config(saved.read_text(encoding="utf-8"), where=str(saved))
        if _comparable(old) != _comparable(config):
            raise ConfigError(f"{out}: expected the config this sweep was started with "
                              f"({saved}) to restart it, got a different one; use another "
                              f"--out for a new sweep")
    else:
        tmp = saved.with_name(saved.name + ".tmp")
        tmp.write_text(config.text, encoding="utf-8")
        tmp.replace(saved)


def _comparable(config: SweepConfig) -> tuple[Any, ...]:
    return (config.family, config.model, config.grid, config.data, config.train,
            config.probe, config.record)


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
    return parse_config(saved.read_text(encoding="utf-8"), where=str(saved))


def _line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


def run_sweep(config: SweepConfig, out: str | Path, *, engine: str = "local",
              workers: int = 2, scheduler: str | None = None, order: str = "largest",
              progress: Callable[[str], None] | None = _line) -> dict[str, Any]:
    """Run every cell not yet done; a failed cell is reported and the others go on.

    ``order="largest"`` starts the largest cells (width² × depth × epochs) first, which
    keeps the workers busy to the end; ``"grid"`` keeps the file's order (small widths
    first in the examples), so that a sweep stopped early has whole rows of the grid.

    Returns:
        The summary written to ``sweep.json``: cell counts, the failures with their
        errors, the engine and the wall time.
    """
    root = Path(out)
    chosen = engines.Engine(engine)
    if workers < 1:
        raise ConfigError(f"expected --workers a positive integer, got {workers}")
    if scheduler is not None and chosen is not engines.Engine.dask:
        raise ConfigError(f"expected --scheduler only with --engine dask, got --engine "
                          f"{chosen.value}")
    prepare(config, root)
    cells = config.cells()
    pending, done = [], 0
    for cell in cells:
        status = read_status(root, cell)
        if status and status.get("status") == STATUS_DONE and store_path(root, cell).exists():
            done += 1
        else:
            pending.append(cell)
    if order not in ("largest", "grid"):
        raise ConfigError(f"expected --order largest or grid, got {order!r}")
    if order == "largest":  # largest first: no large cell left running alone at the end
        pending.sort(key=lambda c: -_cost(config, c))
    say = progress or (lambda _text: None)
    say(f"sweep {config.name}: {len(cells)} cells, {done} already done, {len(pending)} to run "
        f"on {chosen.value} ({workers} worker{'s' if workers != 1 else ''}{', ' + scheduler if scheduler else ''})")
    started = time.perf_counter()
    failed: list[dict[str, Any]] = []
    finished = 0
    if pending:
        if chosen is engines.Engine.local:
            results = engines.local(config, pending, root, workers)
        else:
            results = engines.dask(config, pending, root, workers, scheduler)
        for status in results:
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
                f"~{_duration(eta)} to go")
    wall = time.perf_counter() - started
    summary = {"name": config.name, "cells": len(cells), "done": done, "failed": len(failed),
               "failures": failed, "ran": finished, "engine": chosen.value, "workers": workers,
               "scheduler": scheduler, "wall_seconds": wall, "finished": time.time()}
    write_json(root / SUMMARY_NAME, summary)
    say(f"sweep {config.name}: {done} done, {len(failed)} failed, {finished} run in "
        f"{_duration(wall)}; results in {root}")
    return summary


def read_summary(out: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((out / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data
