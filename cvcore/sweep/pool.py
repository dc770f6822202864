"""Local worker processes that live and die with the sweep that started them.

Each worker is a spawned process that receives cells over a pipe of its own and sends
back each cell's status, so the sweep always knows which cell every worker is running.
A worker:

- ignores Ctrl-C (SIGINT reaches a terminal's whole process group): the sweep alone
  decides, stops its workers (SIGTERM, then SIGKILL) and marks their cells interrupted;
- dies with the sweep: on Linux the kernel kills it when its parent dies
  (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), and everywhere a watcher thread exits it within
  a second of its parent's pid changing; between cells the pipe's end-of-file stops it.

A worker that dies while running a cell (out of memory, a crash in native code) fails
that cell and is replaced; the other cells go on.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cvcore.sweep.cell import STATUS_FAILED, run_cell, status_path, write_json
from cvcore.sweep.config import Cell, SweepConfig

#: ``PR_SET_PDEATHSIG`` from <linux/prctl.h>.
PR_SET_PDEATHSIG = 1
#: Seconds a stopped worker is given to exit after SIGTERM before SIGKILL.
STOP_GRACE_SECONDS = 3.0
#: How often a worker's watcher thread checks that its parent is alive.
PARENT_POLL_SECONDS = 0.5


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C inside the block (from the main thread; elsewhere a no-op).

    Processes started inside inherit the ignored SIGINT (Python then installs no
    KeyboardInterrupt handler in them), and a clean-up inside is not cut short.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def die_with_parent(parent_pid: int) -> None:
    """Make this process exit when ``parent_pid`` (its parent) dies, however it dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_SECONDS)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="cv-sweep-parent-watch", daemon=True).start()


def _serve(conn: Any, config: SweepConfig, sweep_dir: str, parent_pid: int) -> None:
    """A worker's loop: run each cell received, send back its status; stop on None or
    end-of-file (the sweep has gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    while True:
        try:
            cell = conn.recv()
        except (EOFError, OSError):
            return
        if cell is None:
            return
        status = run_cell(config, cell, sweep_dir)
        try:
            conn.send(status)
        except OSError:
            return


@dataclass
class _Worker:
    process: Any
    conn: Any
    cell: Cell | None = None


class LocalPool:
    """``workers`` spawned processes running the cells of one sweep (see the module)."""

    def __init__(self, config: SweepConfig, sweep_dir: Path, workers: int) -> None:
        self.config, self.sweep_dir, self.size = config, sweep_dir, workers
        self.context = multiprocessing.get_context("spawn")
        self.workers: list[_Worker] = []
        self.stopped: list[Cell] = []

    def _start(self) -> _Worker:
        here, there = self.context.Pipe(duplex=True)
        process = self.context.Process(
            target=_serve, args=(there, self.config, str(self.sweep_dir), os.getpid()),
            name="cv-sweep-worker")  # not daemonic: a user's factory may start processes
        with sigint_ignored():  # the worker starts with Ctrl-C ignored
            process.start()
        there.close()
        worker = _Worker(process, here)
        self.workers.append(worker)
        return worker

    def running(self) -> list[Cell]:
        """The cells the workers are running now."""
        return [w.cell for w in self.workers if w.cell is not None]

    def run(self, cells: Sequence[Cell]) -> Iterator[dict[str, Any]]:
        """Run ``cells`` in order on the workers; yield each status as it completes."""
        queue = collections.deque(cells)
        for _ in range(min(self.size, len(queue))):
            self._give(self._start(), queue)
        while any(w.cell is not None for w in self.workers):
            busy = [w for w in self.workers if w.cell is not None]
            ready = set(multiprocessing.connection.wait(
                [w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for worker in busy:
                if worker.conn in ready:
                    try:
                        status = worker.conn.recv()
                    except (EOFError, OSError):
                        status = None
                    if status is not None:
                        worker.cell = None
                        yield status
                        self._give(worker, queue)
                        continue
                if worker.process.sentinel in ready or worker.conn in ready:
                    yield self._lost(worker, queue)

    def _give(self, worker: _Worker, queue: collections.deque[Cell]) -> None:
        """Send the worker the next cell, or tell it to stop when none is left."""
        if not queue:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
            return
        worker.cell = queue.popleft()
        with contextlib.suppress(OSError):  # a dead worker: its sentinel fails the cell
            worker.conn.send(worker.cell)

    def _lost(self, worker: _Worker, queue: collections.deque[Cell]) -> dict[str, Any]:
        """A worker died running a cell: that cell failed; a new worker takes the rest."""
        cell = worker.cell
        assert cell is not None
        worker.process.join(STOP_GRACE_SECONDS)
        code = worker.process.exitcode
        worker.cell = None
        self.workers.remove(worker)
        worker.conn.close()
        status = {"id": cell.id, "index": cell.index, "params": cell.params,
                  "status": STATUS_FAILED, "seconds": 0.0,
                  "error": f"WorkerDied: the worker process running it died (exit code "
                           f"{code}; out of memory?)"}
        write_json(status_path(self.sweep_dir, cell), status)
        if queue:
            self._give(self._start(), queue)
        return status

    def stop(self) -> None:
        """Stop every worker now (SIGTERM, then SIGKILL after a grace) and wait for it;
        the cells they were running are added to :attr:`stopped`."""
        self.stopped += self.running()
        for worker in self.workers:
            if worker.process.is_alive():
                worker.process.terminate()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for worker in self.workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(STOP_GRACE_SECONDS)
            with contextlib.suppress(OSError):
                worker.conn.close()
        self.workers = []
