"""Where a sweep's cells run: local worker processes, or a Dask cluster.

An engine's :class:`Runner` takes the cells still to do and yields each one's status as it
completes, in completion order; on Ctrl-C, :meth:`Runner.interrupt` stops the cells running
and names them. Cells are independent functions of (config, cell, sweep directory) that
write their own files, so the engines only schedule them.

Dask rather than Ray: Dask distributed is a pure-Python package that installs wherever
pip does; dask-jobqueue submits its workers as ordinary Slurm, PBS or SGE jobs from a
login node, with no daemon to run on the cluster beforehand; and an existing scheduler
is reached by its address (``tcp://host:8786``). Ray would need ``ray start`` on every
node and its large binary wheels, for tasks that need none of its actors or object store.
"""

from __future__ import annotations

import contextlib
import enum
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cvcore.errors import InputError
from cvcore.imports import require
from cvcore.sweep.cell import STATUS_FAILED, run_cell, status_path, write_json
from cvcore.sweep.config import Cell, SweepConfig
from cvcore.sweep.pool import LocalPool

#: Schedulers ``--scheduler`` names that dask-jobqueue starts (its own config file, e.g.
#: ``~/.config/dask/jobqueue.yaml``, says the queue, cores, memory and walltime).
JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster"}


class SweepEngine(str, enum.Enum):
    """Where cells run.

    ``local``: worker processes on this machine (``--workers N``, spawned, one torch
    thread each; ``--workers 1`` runs the cells in the calling process). The default.

    ``dask``: a Dask distributed cluster: a new local one of ``--workers`` single-threaded
    worker processes when no ``--scheduler`` is given; an existing one at
    ``--scheduler tcp://host:port``; or workers submitted as batch jobs with
    ``--scheduler slurm`` (``pbs``, ``sge``) through dask-jobqueue. The sweep directory
    must be on a file system the workers share.
    """

    local = "local"
    dask = "dask"


#: Thread pools a worker limits to one thread (set before the worker imports NumPy).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def single_threaded_children() -> Iterator[None]:
    """Processes started inside inherit one-thread BLAS and OpenMP settings."""
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    os.environ.update({k: "1" for k in THREAD_VARIABLES})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Runner:
    """Runs cells and yields each status as it completes; :meth:`interrupt` stops it."""

    def run(self, cells: Sequence[Cell]) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def interrupt(self) -> list[Cell]:
        """Stop every running cell now; return the cells that were stopped unfinished."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the runner holds (worker processes); safe to call twice."""


class InProcess(Runner):
    """``--workers 1``: the cells one after the other in this process."""

    def __init__(self, config: SweepConfig, sweep_dir: Path) -> None:
        self.config, self.sweep_dir = config, sweep_dir
        self.current: Cell | None = None

    def run(self, cells: Sequence[Cell]) -> Iterator[dict[str, Any]]:
        for cell in cells:
            self.current = cell
            status = run_cell(self.config, cell, str(self.sweep_dir))
            self.current = None
            yield status

    def interrupt(self) -> list[Cell]:
        return [self.current] if self.current is not None else []


class Local(Runner):
    """``--workers N``: N spawned worker processes (:class:`cvcore.sweep.pool.LocalPool`)."""

    def __init__(self, config: SweepConfig, sweep_dir: Path, workers: int) -> None:
        self.pool = LocalPool(config, sweep_dir, workers)

    def run(self, cells: Sequence[Cell]) -> Iterator[dict[str, Any]]:
        with single_threaded_children():
            try:
                yield from self.pool.run(cells)
            finally:
                self.pool.stop()

    def interrupt(self) -> list[Cell]:
        self.pool.stop()  # nothing left to stop when Ctrl-C already did inside run()
        return self.pool.stopped

    def close(self) -> None:
        self.pool.stop()


def make_runner(engine: SweepEngine, config: SweepConfig, sweep_dir: Path, workers: int,
                scheduler: str | None) -> Runner:
    """The runner for ``--engine`` / ``--workers`` / ``--scheduler``."""
    if engine is SweepEngine.dask:
        return Dask(config, sweep_dir, workers, scheduler)
    if workers == 1:
        return InProcess(config, sweep_dir)
    return Local(config, sweep_dir, workers)


def check_scheduler(scheduler: str | None) -> None:
    """Refuse a ``--scheduler`` that is neither an address nor a batch system's name."""
    if scheduler is not None and scheduler not in JOBQUEUE and "://" not in scheduler:
        raise InputError(f"expected --scheduler an address (tcp://host:8786) or one of "
                         f"{', '.join(JOBQUEUE)}, got {scheduler!r}")


def _client(workers: int, scheduler: str | None) -> tuple[Any, Any]:
    dist: Any = require("distributed", "sweep", name="Dask distributed")  # untyped package
    Client, LocalCluster = dist.Client, dist.LocalCluster
    if scheduler is None:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster
    if scheduler in JOBQUEUE:
        dask_jobqueue = require("dask_jobqueue", "sweep", name="dask-jobqueue")
        cluster = getattr(dask_jobqueue, JOBQUEUE[scheduler])()
        cluster.scale(jobs=workers)
        return Client(cluster), cluster
    check_scheduler(scheduler)
    try:
        return Client(scheduler, timeout="30s"), None
    except OSError as exc:
        raise InputError(f"expected a Dask scheduler at {scheduler}, got {exc}") from None


class Dask(Runner):
    """``--engine dask``: the cells as Dask tasks (see :class:`SweepEngine`)."""

    def __init__(self, config: SweepConfig, sweep_dir: Path, workers: int,
                 scheduler: str | None) -> None:
        self.config, self.sweep_dir = config, sweep_dir
        self.workers, self.scheduler = workers, scheduler
        self.futures: dict[Any, Cell] = {}
        self.completed: set[str] = set()

    def run(self, cells: Sequence[Cell]) -> Iterator[dict[str, Any]]:
        import distributed

        dask_completed: Any = distributed.as_completed  # untyped package

        with single_threaded_children():
            client, cluster = _client(self.workers, self.scheduler)
        token = f"{time.time_ns():x}"
        try:
            self.futures = {client.submit(run_cell, self.config, cell, str(self.sweep_dir),
                                          pure=False, key=f"cv-sweep-{cell.id}-{token}"): cell
                            for cell in cells}
            for future in dask_completed(self.futures):
                cell = self.futures[future]
                self.completed.add(cell.id)
                try:
                    yield future.result()
                except Exception as exc:  # noqa: BLE001 - a worker died (KilledWorker, ...)
                    yield _failed(cell, self.sweep_dir,
                                  f"{type(exc).__name__}: Dask task failed: {exc}")
        finally:
            with contextlib.suppress(Exception):  # a clean-up: the cells' outcome is written
                client.cancel([f for f, c in self.futures.items()
                               if c.id not in self.completed])
            client.close()
            if cluster is not None:
                cluster.close()

    def interrupt(self) -> list[Cell]:
        """Every cell submitted and not finished (a task already running on an existing
        cluster cannot be stopped from here; it finishes and writes its own status)."""
        return [c for c in self.futures.values() if c.id not in self.completed]


def _failed(cell: Cell, sweep_dir: Path, error: str) -> dict[str, Any]:
    status = {"id": cell.id, "index": cell.index, "params": cell.params,
              "status": STATUS_FAILED, "error": error, "seconds": 0.0}
    write_json(status_path(sweep_dir, cell), status)
    return status
