"""Reading checkpoints: choose a loader by the file's content first, its extension second."""

from __future__ import annotations

import re
from pathlib import Path

from cvcore import plugins
from cvcore.errors import InputError, MissingFrameworkError
from cvcore.protocols import LoadedModel, LoadOptions


def natural_key(path: str | Path) -> list[object]:
    """Sort key that puts ``epoch_2`` before ``epoch_10``.

    >>> sorted(["e_10.pt", "e_2.pt", "e_1.pt"], key=natural_key)
    ['e_1.pt', 'e_2.pt', 'e_10.pt']
    """
    parts = re.split(r"(\d+)", str(path))
    return [int(p) if p.isdigit() else p.lower() for p in parts]


def load_checkpoint(path: Path, options: LoadOptions) -> LoadedModel:
    """Load one checkpoint with the first loader whose content test matches."""
    if not path.exists():
        raise InputError(f"{path}: expected an existing checkpoint, got no such file or directory")
    if path.is_file() and path.stat().st_size == 0:
        raise InputError(f"{path}: expected a checkpoint, got an empty file")
    loaders = list(plugins.registry().checkpoint_loaders.values())
    chosen = next((ld for ld in loaders if ld.available() and hasattr(ld, "prefers")
                   and ld.prefers(path, options)), None)
    if chosen is None:
        chosen = next((ld for ld in loaders if ld.available() and ld.sniff(path)), None)
    if chosen is None:
        suffix = path.suffix.lower()
        by_ext = [ld for ld in loaders if suffix in ld.extensions]
        if by_ext:
            chosen = by_ext[0]
            if not chosen.available():
                raise MissingFrameworkError(chosen.name, plugins.install_command(chosen))
    if chosen is None:
        names = sorted(plugins.registry().checkpoint_loaders)
        kind = "a directory" if path.is_dir() else f"a file of unknown format ({path.suffix or 'no extension'})"
        raise InputError(
            f"{path}: expected a checkpoint one of the loaders {names} recognises, got {kind}"
        )
    return chosen.load(path, options)
