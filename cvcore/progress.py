"""Progress of long work, reported to whoever listens (the CLI draws a bar on stderr).

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
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

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
