"""The checkpoint loader for ``.npz`` files written by :meth:`NumpyMLP.save`.

cvcore's own NumPy *data* loader also reads ``.npz`` files, but data loaders and
checkpoint loaders are separate registries: ``cv measure model.npz --data x.npz`` reads
the first with this loader and the second with cvcore's. The loader claims a file by its
content (the marker array), never by its extension, so other ``.npz`` files stay
unclaimed and get cvcore's usual "unknown format" error.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cvcore.errors import InputError
from cvcore.protocols import LoadedModel, LoadOptions

from cvcore_numpy_mlp.model import MARKER, NumpyMLP


def has_marker(path: Path) -> bool:
    """Whether ``path`` is a zip archive holding the ``MARKER`` array (reads the index only)."""
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return f"{MARKER}.npy" in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


@dataclass(frozen=True)
class NumpyMLPLoader:
    """Reads :class:`NumpyMLP` checkpoints (``.npz`` with a ``__cvcore_numpy_mlp__`` array)."""

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = "numpy-mlp"
    extra: str = ""
    extensions: tuple[str, ...] = ()

    def available(self) -> bool:
        return True

    def sniff(self, path: Path) -> bool:
        return has_marker(path)

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        if not has_marker(path):
            raise InputError(f"{path}: expected a numpy-mlp checkpoint (.npz with a {MARKER} "
                             "array), got a file without the marker")
        model = NumpyMLP.load(path)
        sizes = [model.n_inputs] + [w.shape[0] for w, _ in model.layers]
        return LoadedModel(model=model, backend="numpy-mlp", info={"sizes": sizes})


#: Every loader this package registers (``cvcore_register_loaders`` registers each).
LOADERS = (NumpyMLPLoader(),)
