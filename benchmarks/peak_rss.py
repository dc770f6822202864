"""Peak rise of a process's resident set during a block, for the benchmark scripts.

Shared by ``run.py`` and ``nt_peer.py`` (which runs in neural-tangents' own venv), so it
uses the standard library only. ``tracemalloc`` does not see torch's or XLA's
allocators and ``ru_maxrss`` is a lifetime high-water mark, hence the sampling.
"""

from __future__ import annotations

import os
import threading


class PeakRSS:
    """Peak rise of the resident set during a block (sampled from /proc/self/statm)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def rise(self) -> int:
        return self.peak - self.base
