"""Writing output files safely: one check of an output path, one atomic write.

Every file cvcore writes (tables, figures, JSON, exports) goes through :func:`atomic_output`:
the bytes land in a temporary file beside the target and are renamed over it only once
complete, so a reader or a killed process never sees a half-written file. Before any work
starts, :func:`check_output_path` refuses, in one line, a path that cannot or must not be
written: a directory, a missing or read-only folder, an existing file without ``force``, or
one of the command's own inputs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from cvcore.errors import InputError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(path: str | Path, *, what: str = "output", force: bool = True,
                      sources: Iterable[str | Path] = ()) -> Path:
    """``path`` as a :class:`Path` if a file can be written there, else one-line :class:`InputError`.

    ``force=False`` refuses an existing file; ``sources`` are files the command reads, which an
    output must never replace (compared by identity on disk as well as by resolved name).
    """
    path = Path(path)
    for src in sources:
        src = Path(src)
        if path.resolve() == src.resolve() or _same_file(path, src):
            raise InputError(f"expected the {what} path to differ from the input {src}, got the same "
                             f"file (writing it would destroy the input)")
    if path.is_dir():
        raise InputError(f"{path}: expected a file path for the {what}, got a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise InputError(f"{path}: expected the folder {parent} to exist, got no such directory")
    if not parent.is_dir():
        raise InputError(f"{path}: expected {parent} to be a folder, got a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: expected a writable folder for the {what}, got a read-only {parent}")
    if path.exists() or path.is_symlink():
        if not force:
            raise InputError(f"{path}: expected a new file for the {what}, got an existing one "
                             f"(pass --force to replace it)")
        if path.exists() and not os.access(path, os.W_OK):
            raise InputError(f"{path}: expected a writable file for the {what}, got a read-only one")
    return path


def _mode_for(path: Path) -> int:
    """The permissions ``path`` keeps (an existing file's) or gets (a new file: 0666 less umask).

    ``mkstemp`` creates its file 0600; without this every table and figure would be private.
    """
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


@contextlib.contextmanager
def atomic_output(path: str | Path, *, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` if the block succeeds.

    On any exception (Ctrl-C included) the temporary file is removed and ``path`` is left as it
    was. ``suffix`` keeps an extension some writers need (matplotlib picks the format from it).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix if suffix is not None else ".tmp",
                               dir=parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) so that it is never seen half-written."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that it is never seen half-written."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
