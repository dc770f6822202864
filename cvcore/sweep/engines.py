"""Where a sweep's cells run: local worker processes, or a Dask cluster.

An engine takes the cells still to do and yields each one's status as it completes, in
completion order. Cells are independent functions of (config, cell, sweep directory)
that write their own files, so the engines only schedule them.

Dask rather than Ray: Dask distributed is a pure-Python package that installs wherever
pip does; dask-jobqueue submits its workers as ordinary Slurm, PBS or SGE jobs from a
login node, with no daemon to run on the cluster beforehand; and an existing scheduler
is reached by its address (``tcp://host:8786``). Ray would need ``ray start`` on every
node and its large binary wheels, for tasks that need none of its actors or object store.
"""

from __future__ import annotations

import contextlib
import enum
import multiprocessing
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from cvcore.errors import InputError
from cvcore.imports import require
from cvcore.sweep.cell import STATUS_FAILED, run_cell, status_path, write_json
from cvcore.sweep.config import Cell, SweepConfig

#: Schedulers ``--scheduler`` names that dask-jobqueue starts (its own config file, e.g.
#: ``~/.config/dask/jobqueue.yaml``, says the queue, cores, memory and walltime).
JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster"}


class Engine(str, enum.Enum):
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


def _failed(config: SweepConfig, cell: Cell, sweep_dir: Path, error: str) -> dict[str, Any]:
    status = {"id": cell.id, "index": cell.index, "params": cell.params,
              "status": STATUS_FAILED, "error": error, "seconds": 0.0}
    write_json(status_path(sweep_dir, cell), status)
    return status


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


def local(config: SweepConfig, cells: Sequence[Cell], sweep_dir: Path,
          workers: int) -> Iterator[dict[str, Any]]:
    """Run cells in ``workers`` spawned processes (one worker: in this process); yield
    each status as it completes."""
    if workers == 1:
        for cell in cells:
            yield run_cell(config, cell, str(sweep_dir))
        return
    context = multiprocessing.get_context("spawn")
    with single_threaded_children(), ProcessPoolExecutor(max_workers=workers,
                                                         mp_context=context) as pool:
        futures = {pool.submit(run_cell, config, cell, str(sweep_dir)): cell for cell in cells}
        for future in as_completed(futures):
            cell = futures[future]
            try:
                yield future.result()
            except Exception as exc:  # noqa: BLE001 - the worker process died
                yield _failed(config, cell, sweep_dir,
                              f"{type(exc).__name__}: worker process failed: {exc}")


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
    if "://" not in scheduler:
        raise InputError(f"expected --scheduler an address (tcp://host:8786) or one of "
                         f"{', '.join(JOBQUEUE)}, got {scheduler!r}")
    try:
        return Client(scheduler, timeout="30s"), None
    except OSError as exc:
        raise InputError(f"expected a Dask scheduler at {scheduler}, got {exc}") from None


def dask(config: SweepConfig, cells: Sequence[Cell], sweep_dir: Path, workers: int,
         scheduler: str | None) -> Iterator[dict[str, Any]]:
    """Run cells as Dask tasks; yield each status as it completes."""
    import distributed

    dask_completed: Any = distributed.as_completed  # untyped package

    with single_threaded_children():
        client, cluster = _client(workers, scheduler)
    token = f"{time.time_ns():x}"
    try:
        futures = {client.submit(run_cell, config, cell, str(sweep_dir), pure=False,
                                 key=f"cv-sweep-{cell.id}-{token}"): cell for cell in cells}
        for future in dask_completed(futures):
            cell = futures[future]
            try:
                yield future.result()
            except Exception as exc:  # noqa: BLE001 - a worker died (KilledWorker, ...)
                yield _failed(config, cell, sweep_dir,
                              f"{type(exc).__name__}: Dask task failed: {exc}")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
