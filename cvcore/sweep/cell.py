"""One cell of a sweep: train a model (PyTorch) and record it into its own store.

Deterministic per cell (torch seeded with the cell's seed, batches drawn from a
generator of its own) and single-threaded, so parallel workers do not oversubscribe the
cores. A cell first writes its status file as ``running`` (the sweep's claim on the
cell's files), then trains and records, and writes its final status last: a cell whose
status says ``done`` is never redone. A record store beside no status file was not
written by the sweep and is never deleted: the cell fails and says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cvcore.files import write_text_atomic
from cvcore.sweep.config import Cell, SweepConfig

STATUS_DONE = "done"
STATUS_FAILED = "failed"
STATUS_RUNNING = "running"
STATUS_INTERRUPTED = "interrupted"
#: The files SQLite keeps beside a record store.
STORE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def store_path(sweep_dir: Path, cell: Cell) -> Path:
    return sweep_dir / "cells" / f"{cell.id}.db"


def status_path(sweep_dir: Path, cell: Cell) -> Path:
    return sweep_dir / "cells" / f"{cell.id}.json"


class StatusProblem(str):
    """Why a status file could not be read (a one-line reason, not a status)."""


def read_status(sweep_dir: Path, cell: Cell) -> dict[str, Any] | StatusProblem | None:
    """The cell's status; None when it has no status file; a :class:`StatusProblem` when
    the file is there but unreadable, not JSON, or not a status (the cell is not done)."""
    path = status_path(sweep_dir, cell)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        return StatusProblem(f"unreadable ({exc.strerror or exc})")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return StatusProblem(f"not JSON ({str(exc).splitlines()[0] if str(exc) else exc!r})")
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        return StatusProblem("not a cell status (no 'status' field)")
    return data


def is_done(sweep_dir: Path, cell: Cell, status: dict[str, Any] | StatusProblem | None) -> bool:
    """Whether the cell finished: its status says done and its store is there."""
    return (isinstance(status, dict) and status.get("status") == STATUS_DONE
            and store_path(sweep_dir, cell).exists())


def write_json(path: Path, data: Any) -> None:
    """Write atomically (a temporary file of a unique name, then a rename)."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=False))


class ForeignFileError(RuntimeError):
    """A file where the cell's store goes that the sweep did not write."""


def _claim(root: Path, cell: Cell) -> None:
    """Delete what an earlier unfinished run of this cell left, then mark it running.

    Only files beside a status file of this sweep are deleted (the status file is written
    before the store); a store without one is someone else's and stays.
    """
    db = store_path(root, cell)
    leftovers = [Path(str(db) + suffix) for suffix in STORE_SUFFIXES]
    present = [p for p in leftovers if p.exists() or p.is_symlink()]
    if present and not status_path(root, cell).exists():
        raise ForeignFileError(f"expected no file at {present[0]} (this sweep did not write "
                               f"it and will not delete it), got one; move it away")
    for path in present:  # an unfinished cell of this sweep starts afresh
        path.unlink(missing_ok=True)


def run_cell(config: SweepConfig, cell: Cell, sweep_dir: str | Path) -> dict[str, Any]:
    """Train and record one cell; never raises for the cell's own failure.

    Ctrl-C (KeyboardInterrupt) while the cell runs writes its status as ``interrupted``
    and is raised again.

    Returns:
        The status written: ``status`` (``done`` or ``failed``), ``id``, ``params``,
        ``seconds``, and ``n_params`` and ``final`` numbers, or ``error`` and
        ``traceback``.
    """
    root = Path(sweep_dir)
    (root / "cells").mkdir(parents=True, exist_ok=True)
    db = store_path(root, cell)
    started, cpu = time.perf_counter(), time.process_time()
    status: dict[str, Any] = {"id": cell.id, "index": cell.index, "params": cell.params,
                              "host": os.uname().nodename, "pid": os.getpid()}
    try:
        _claim(root, cell)
    except ForeignFileError as exc:  # no status file: the next run must not delete it either
        return {**status, "status": STATUS_FAILED, "error": f"ForeignFileError: {exc}",
                "seconds": 0.0}
    try:
        write_json(status_path(root, cell), {
            **status, "status": STATUS_RUNNING, "started": time.time(),
            "error": "running, or stopped before it could write its status"})
        with _one_thread():
            status.update(_train(config, cell, db))
        status["status"] = STATUS_DONE
    except KeyboardInterrupt:
        status.update(status=STATUS_INTERRUPTED, error="interrupted (Ctrl-C)",
                      seconds=time.perf_counter() - started)
        with contextlib.suppress(OSError):
            write_json(status_path(root, cell), status)
        raise
    except Exception as exc:  # noqa: BLE001 - a failed cell is reported, never fatal
        status["status"] = STATUS_FAILED
        status["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        status["traceback"] = traceback.format_exc()
    status["seconds"] = time.perf_counter() - started
    status["cpu_seconds"] = time.process_time() - cpu  # this process's CPU time: load-free
    write_json(status_path(root, cell), status)
    return status


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One BLAS / OpenMP thread for NumPy's eigensolver and torch alike, whatever the
    engine (threadpoolctl comes with scikit-learn; without it, torch's own setting)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1):
        yield


def _train(config: SweepConfig, cell: Cell, db: Path) -> dict[str, Any]:
    import torch

    from cvcore.sweep.families import family_module
    from cvcore.sweep.models import initialise
    from cvcore.sweep.train import run_epochs

    torch.set_num_threads(1)
    params, recipe, seed = config.resolve(cell)
    family = family_module(config.family)
    if family is not None and hasattr(family, "train"):
        result: dict[str, Any] = family.train(config, cell, db, params, recipe, seed)
        return result
    torch.manual_seed(seed)
    if family is None:
        task = _tabular_task(config, recipe)
        from cvcore.sweep.models import build_model

        model = build_model(config.family, params, in_features=task.in_features,
                            out_features=task.out_features)
    else:
        task = family.task(config, params, recipe, seed)
        model = family.build(params, task)
    initialise(model, recipe.init)
    return run_epochs(config, cell, db, model, task, recipe, seed)


def _tabular_task(config: SweepConfig, recipe: Any) -> Any:
    """The dense and conv families' task: a table of features, classes or a target."""
    import torch

    from cvcore.errors import InputError
    from cvcore.sweep.data import load_split
    from cvcore.sweep.train import Task

    split = load_split(config.data)
    if recipe.loss == "cross_entropy" and not split.classes:
        raise InputError(f"[train] loss: expected mse for the regression target of "
                         f"{config.data.dataset!r}, got cross_entropy")
    x_tr, x_te = torch.from_numpy(split.x_train), torch.from_numpy(split.x_test)
    y_tr, y_te = torch.from_numpy(split.y_train), torch.from_numpy(split.y_test)
    if recipe.loss == "cross_entropy":
        def loss_fn(out: Any, y: Any) -> Any:
            return torch.nn.functional.cross_entropy(out, y)
    elif split.classes:
        def loss_fn(out: Any, y: Any) -> Any:
            target = torch.nn.functional.one_hot(y, split.classes).to(out.dtype)
            return torch.nn.functional.mse_loss(out, target)
    else:
        def loss_fn(out: Any, y: Any) -> Any:
            return torch.nn.functional.mse_loss(out, y)

    def evaluate(model: Any) -> dict[str, float]:
        out_tr, out_te = model(x_tr), model(x_te)
        numbers = {"train_loss": float(loss_fn(out_tr, y_tr)),
                   "test_loss": float(loss_fn(out_te, y_te))}
        if split.classes:
            numbers["train_accuracy"] = float((out_tr.argmax(1) == y_tr).float().mean())
            numbers["test_accuracy"] = float((out_te.argmax(1) == y_te).float().mean())
        return numbers

    probe: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    if config.probe.train:
        probe["train"] = x_tr[:min(config.probe.train, len(x_tr))]
        targets["train"] = y_tr[:len(probe["train"])]
    if config.probe.test:
        probe["test"] = x_te[:min(config.probe.test, len(x_te))]
        targets["test"] = y_te[:len(probe["test"])]
    return Task(x_tr, y_tr, probe, lambda model, x, y: loss_fn(model(x), y), evaluate,
                in_features=split.in_features, out_features=split.out_features,
                probe_targets=targets)
