"""Progress of long work, reported to whoever listens, and shown by :func:`shown`.

Nothing here prints. A caller installs a callback with :func:`reporting`; the code doing
the work (the checkpoint loop, the stochastic estimator's products, a backend's sample
blocks) calls :func:`advance` with a stage name, how much is done and the total. Without a
callback :func:`advance` does nothing, so libraries and tests pay nothing for it.

The callback travels in a :class:`contextvars.ContextVar`, so it reaches the backends
without a parameter in every signature and stays local to one thread or task.

>>> seen = []
>>> with reporting(lambda stage, done, total: seen.append((stage, done, total))):
...     advance("sample blocks", 1, 2)
>>> advance("sample blocks", 2, 2)  # no listener: nothing happens
>>> seen
[('sample blocks', 1, 2)]

:func:`shown` is the listener that shows it: on a terminal a ``rich.progress`` bar per
stage with the time elapsed and the time left; elsewhere (a log file, a pipe, a notebook,
whose stderr is not a TTY) one plain line per stage every ``interval`` seconds and when
the stage completes, e.g. ``checkpoints: 3/10 (30%), 12.0 s elapsed, about 28.0 s left``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TextIO

#: ``callback(stage, done, total)``: ``done`` of ``total`` units of ``stage`` are finished
#: (``total`` is ``None`` when unknown).
Callback = Callable[[str, int, "int | None"], None]

_listener: ContextVar[Callback | None] = ContextVar("cvcore_progress", default=None)


@contextmanager
def reporting(callback: Callback | None) -> Iterator[None]:
    """Send :func:`advance` calls to ``callback`` inside the ``with`` block."""
    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)


def advance(stage: str, done: int, total: int | None) -> None:
    """Report that ``done`` of ``total`` units of ``stage`` are finished."""
    callback = _listener.get()
    if callback is not None:
        callback(stage, done, total)


def active() -> bool:
    """Whether anyone listens (to skip preparing a report that nobody reads)."""
    return _listener.get() is not None


def duration(seconds: float) -> str:
    """Seconds in words short enough for a progress line.

    >>> duration(4.25), duration(75), duration(4000)
    ('4.2 s', '1 min 15 s', '1 h 6 min')
    """
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class PlainLines:
    """A listener writing one line per stage at most every ``interval`` seconds, and one
    when a stage completes: ``stage: done/total (p%), elapsed, about t left``.

    Nothing is written before ``interval`` seconds have passed since the listener started:
    work that ends (or fails) sooner leaves no progress lines, so a mistake stays the one
    line on stderr that scripts read. A stage is timed from the previous report of any
    stage (or from the listener's start): its work began after that.

    >>> import io
    >>> out, now = io.StringIO(), iter([0.0, 2.0, 12.0, 13.0, 30.0])
    >>> lines = PlainLines(out, interval=10.0, clock=lambda: next(now))
    >>> lines("checkpoints", 1, 4)  # 2 s in: too early to say anything
    >>> lines("checkpoints", 2, 4); lines("checkpoints", 3, 4); lines("checkpoints", 4, 4)
    >>> print(out.getvalue(), end="")
    checkpoints: 2/4 (50%), 12.0 s elapsed, about 12.0 s left
    checkpoints: 4/4 (100%), 30.0 s elapsed, done
    """

    def __init__(self, stream: TextIO, *, interval: float = 10.0,
                 clock: Callable[[], float] | None = None) -> None:
        self.stream, self.interval = stream, interval
        self.clock = time.monotonic if clock is None else clock
        self._started: dict[str, float] = {}
        self._shown: dict[str, float] = {}
        self._last = self._origin = self.clock()
        self._spoken = False

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        now = self.clock()
        if not self._spoken and now - self._origin < self.interval:
            if stage not in self._started or done == 0:
                self._started[stage] = self._last
            self._last = now
            return
        if stage not in self._started or done == 0:
            self._started[stage] = self._last
            self._shown.pop(stage, None)
        self._last = now
        finished = total is not None and done >= total
        last = self._shown.get(stage)
        if not finished and last is not None and now - last < self.interval:
            return
        self._shown[stage] = now
        elapsed = now - self._started[stage]
        if total is None:
            text = f"{stage}: {done}, {duration(elapsed)} elapsed"
        elif finished:
            text = f"{stage}: {done}/{total} (100%), {duration(elapsed)} elapsed, done"
        else:
            left = elapsed / done * (total - done) if done else None
            text = (f"{stage}: {done}/{total} ({100 * done // max(total, 1)}%), "
                    f"{duration(elapsed)} elapsed, "
                    + ("time left unknown" if left is None else f"about {duration(left)} left"))
        self.stream.write(text + "\n")
        self.stream.flush()
        self._spoken = True
        if finished:
            self._started.pop(stage, None)
            self._shown.pop(stage, None)


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is a terminal (a notebook's or a log file's stream is not)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


@contextmanager
def shown(stream: TextIO | None = None, *, interval: float = 10.0,
          terminal: bool | None = None) -> Iterator[None]:
    """Show the progress reported inside the ``with`` block on ``stream`` (default: stderr).

    On a terminal (``terminal=None``: whether ``stream`` is a TTY), a ``rich.progress`` bar
    per stage with done/total, the time elapsed and the time left, removed when the work
    ends; otherwise :class:`PlainLines`, one line per stage every ``interval`` seconds and
    at its end, which log files and notebooks keep readable.
    """
    stream = sys.stderr if stream is None else stream
    if not (is_terminal(stream) if terminal is None else terminal):
        with reporting(PlainLines(stream, interval=interval)):
            yield
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                   console=Console(file=stream, highlight=False), transient=True)
    tasks: dict[str, Any] = {}

    def update(stage: str, done: int, total: int | None) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done, total=total)

    with bar, reporting(update):
        yield
