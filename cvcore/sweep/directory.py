"""The sweep directory: checked before anything is made, locked while a sweep runs.

- :func:`check_out` refuses, in one line and before anything is created, an ``--out``
  that is a file, lies under a file, cannot be created or written, or is a non-empty
  folder that is not a sweep directory (one holding the ``sweep.toml`` a sweep wrote):
  a sweep never adopts, and so never writes or deletes in, a folder of someone else's.
- :class:`SweepLock` holds an OS lock (``flock``) on ``.sweep.lock`` inside the directory
  while the sweep runs: a second ``cv sweep`` on it is refused, naming the holder (pid,
  host, start time). The kernel drops the lock when its holder dies however it dies, so
  a killed sweep never blocks the next one.
- :func:`open_sweep_dir` creates the directory (under the lock) and writes ``sweep.toml``, or
  checks that the one there is the same config (a restart).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from cvcore.errors import InputError
from cvcore.files import write_text_atomic
from cvcore.sweep.config import ConfigError, SweepConfig, parse_config

CONFIG_NAME = "sweep.toml"
SUMMARY_NAME = "sweep.json"
LOCK_NAME = ".sweep.lock"


class SweepBusyError(InputError):
    """Another ``cv sweep`` holds the sweep directory."""


def _entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)


def check_out(out: Path) -> None:
    """Refuse an ``--out`` a sweep cannot or must not use (see the module); create nothing."""
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{out}: expected a folder for the sweep (--out), got a file")
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputError(f"{out}: expected a writable folder for the sweep (--out), got "
                             f"a read-only one")
        try:
            entries = _entries(out)
        except OSError as exc:
            raise InputError(f"{out}: expected a readable folder for the sweep (--out), got "
                             f"{exc.strerror or exc}") from None
        if entries and not (out / CONFIG_NAME).is_file():
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise InputError(f"{out}: expected an empty folder or a sweep directory (with "
                             f"{CONFIG_NAME}) for the sweep (--out), got a folder of other "
                             f"files ({shown}); choose another --out")
        return
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{out}: expected {ancestor} to be a folder to create the sweep in "
                         f"(--out), got a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{out}: expected a writable folder to create the sweep in "
                         f"(--out), got a read-only {ancestor}")


class SweepLock:
    """An exclusive OS lock on ``out/.sweep.lock``; the file names the holder."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`SweepBusyError` naming its holder."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by workers
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _describe_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SweepBusyError(f"{self.path.parent}: expected no other cv sweep running "
                                     f"on this directory, got one: {holder}") from None
            raise InputError(f"{self.path.parent}: expected a file system that supports "
                             f"file locks for the sweep (--out), got {exc.strerror or exc}"
                             ) from None
        os.ftruncate(fd, 0)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.write(fd, json.dumps(me).encode("utf-8"))
        self.fd = fd

    def release(self) -> None:
        """Let go of the lock (the file stays: removing it would race a waiting sweep)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def _describe_holder(fd: int) -> str:
    """``pid 123 on host h, started 2024-05-01 13:29:08`` from the lock file's text."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode("utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return f"pid {int(info['pid'])} on host {info['host']}, started {started}"
    return "a process that has not yet written its name"


def comparable(config: SweepConfig) -> tuple[Any, ...]:
    """What must match for a sweep directory to be restarted with a config."""
    return (config.family, config.model, config.grid, config.data, config.train,
            config.probe, config.record)


def open_sweep_dir(config: SweepConfig, out: Path) -> SweepLock:
    """Create (or reuse) the sweep directory, lock it, and write or check ``sweep.toml``.

    The caller releases the returned lock when the sweep ends.
    """
    check_out(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{out}: expected a folder the sweep can create (--out), got "
                         f"{exc.strerror or exc}") from None
    lock = SweepLock(out)
    lock.acquire()
    try:
        check_out(out)  # again, under the lock
        saved = out / CONFIG_NAME
        if saved.exists():
            try:
                text = saved.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{saved}: expected the config this sweep was started "
                                  f"with, got an unreadable file ({exc})") from None
            old = parse_config(text, where=str(saved))
            if comparable(old) != comparable(config):
                raise ConfigError(f"{out}: expected the config this sweep was started with "
                                  f"({saved}) to restart it, got a different one; use another "
                                  f"--out for a new sweep")
        else:
            write_text_atomic(saved, config.text)
        (out / "cells").mkdir(exist_ok=True)
    except BaseException:
        lock.release()
        raise
    return lock
