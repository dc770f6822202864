"""TensorFlow / Keras checkpoint loaders: ``.keras`` archives, SavedModel directories and
HDF5 (``.h5``) files.

Keras files are deserialized with ``safe_mode=True``: a ``Lambda`` layer's pickled
bytecode is refused (nothing from it runs) unless the user passes ``--trust``. A
SavedModel's graph is checked op by op before TensorFlow loads it
(:mod:`cvcore.backends.keras.graph_check`), unless ``--trust``.
"""

from __future__ import annotations

import importlib.util
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cvcore.data_io import ZIP_MAGIC
from cvcore.errors import InputError, UntrustedFileError, first_line
from cvcore.imports import require
from cvcore.model_factory import resolve_factory
from cvcore.protocols import LoadedModel, LoadOptions

from .graph_check import check_saved_model

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: Members every Keras 3 ``.keras`` archive has.
KERAS_MEMBERS = ("config.json", "metadata.json")


def _available() -> bool:
    return importlib.util.find_spec("keras") is not None or importlib.util.find_spec(
        "tensorflow") is not None



def _head(path: Path, n: int = 8) -> bytes:
    if not path.is_file():
        return b""
    with path.open("rb") as fh:
        return fh.read(n)


def is_keras_archive(path: Path) -> bool:
    """A Keras 3 ``.keras`` zip (``config.json`` and ``metadata.json`` inside)."""
    if not _head(path).startswith(ZIP_MAGIC):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
    except zipfile.BadZipFile:
        return False
    return all(m in names for m in KERAS_MEMBERS)


def is_saved_model(path: Path) -> bool:
    """A SavedModel directory (``saved_model.pb`` inside)."""
    return path.is_dir() and (path / "saved_model.pb").is_file()


def is_hdf5(path: Path) -> bool:
    """An HDF5 file (by its 8-byte signature)."""
    return _head(path) == HDF5_MAGIC


def load_keras_model(path: Path, trust: bool, what: str) -> Any:
    """``keras.saving.load_model`` with ``safe_mode`` unless ``trust``; one-line errors."""
    keras = require("keras", "tensorflow")
    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=not trust)
    except Exception as exc:  # noqa: BLE001 - any malformed file becomes one line
        message = first_line(exc)
        if "safe_mode" in str(exc) or "unsafe" in str(exc).lower():
            raise UntrustedFileError(
                f"{path}: expected a {what} without arbitrary code (safe_mode), got {message}; "
                "nothing was run. If you made this file yourself, pass --trust to load it"
            ) from None
        raise InputError(f"{path}: expected a readable {what}, got {message}") from None


@dataclass(frozen=True)
class KerasArchiveLoader:
    """Keras 3 ``.keras`` archives (a whole model)."""

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = "keras"
    extra: str = "tensorflow"
    extensions: tuple[str, ...] = (".keras",)

    def available(self) -> bool:
        return _available()

    def sniff(self, path: Path) -> bool:
        return is_keras_archive(path)

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        if not is_keras_archive(path):
            kind = "a directory" if path.is_dir() else "content that is not a .keras archive"
            raise InputError(f"{path}: expected a Keras .keras archive (zip), got {kind}")
        if not options.trust and importlib.util.find_spec("h5py") is not None:
            try:
                check_keras_archive_weights(path)
            except (OSError, zipfile.BadZipFile) as exc:
                raise InputError(f"{path}: expected a readable .keras archive, got "
                                 f"{first_line(exc)}") from None
        return LoadedModel(model=load_keras_model(path, options.trust, ".keras model"),
                           backend="tensorflow")


@dataclass(frozen=True)
class SavedModelLoader:
    """TensorFlow SavedModel directories (``tf.saved_model.save`` / ``model.export``); without
    ``--trust`` only graphs of side-effect-free ops are loaded."""

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = "saved-model"
    extra: str = "tensorflow"
    extensions: tuple[str, ...] = ()

    def available(self) -> bool:
        return importlib.util.find_spec("tensorflow") is not None

    def sniff(self, path: Path) -> bool:
        return is_saved_model(path)

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        if not is_saved_model(path):
            raise InputError(f"{path}: expected a SavedModel directory with saved_model.pb, "
                             "got none")
        tf = require("tensorflow")
        if not options.trust:
            check_saved_model(path)  # parses saved_model.pb only; nothing is loaded or run
        try:
            model = tf.saved_model.load(str(path))
        except Exception as exc:  # noqa: BLE001 - any malformed directory becomes one line
            raise InputError(f"{path}: expected a readable SavedModel, got "
                             f"{first_line(exc)}") from None
        return LoadedModel(model=model, backend="tensorflow")


def h5_outside_reference(fh: Any) -> str | None:
    """The first link or dataset of an open HDF5 file that reads another file, else ``None``.

    h5py follows external links and reads external and virtual datasets from whatever file
    they name, so weights could come from any local file; such an HDF5 file is refused.
    """
    import h5py

    pending = [("", fh)]
    while pending:
        prefix, group = pending.pop()
        for name in group:
            where = f"{prefix}/{name}"
            link = group.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                return f"an external link {where} -> {link.filename}:{link.path}"
            if isinstance(link, h5py.SoftLink):
                continue  # points inside this file; its target is visited on its own
            item = group.get(name)
            if isinstance(item, h5py.Group):
                pending.append((where, item))
            elif isinstance(item, h5py.Dataset):
                if item.is_virtual:
                    return f"a virtual dataset {where}"
                if item.external:
                    return f"a dataset {where} stored in the external file {item.external[0][0]!r}"
    return None


def check_h5_self_contained(path: Path, source: Any = None) -> None:
    """Refuse an HDF5 file (``path``, or the file object ``source`` read from it) whose data
    lives in other files; one-line :class:`UntrustedFileError`."""
    import h5py

    with h5py.File(source if source is not None else path, "r") as fh:
        found = h5_outside_reference(fh)
    if found is not None:
        raise UntrustedFileError(
            f"{path}: expected an HDF5 file holding its own data, got {found} (another file "
            "would be read as weights); nothing was read. If you made this file yourself, pass "
            "--trust to load it")


def check_keras_archive_weights(path: Path) -> None:
    """The same check for the ``.h5`` weights inside a ``.keras`` archive."""
    import io

    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith(".h5"):
                check_h5_self_contained(path, io.BytesIO(zf.read(name)))


def _h5_has_model(path: Path) -> bool:
    import h5py

    with h5py.File(path, "r") as fh:
        return "model_config" in fh.attrs


@dataclass(frozen=True)
class H5Loader:
    """HDF5 files: a whole legacy Keras model, or weights with ``--model``."""

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = "keras-h5"
    extra: str = "tensorflow"
    extensions: tuple[str, ...] = (".h5", ".hdf5")

    def available(self) -> bool:
        return _available() and importlib.util.find_spec("h5py") is not None

    def sniff(self, path: Path) -> bool:
        return is_hdf5(path)

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        if not is_hdf5(path):
            raise InputError(f"{path}: expected an HDF5 file, got other content")
        try:
            if not options.trust:
                check_h5_self_contained(path)
            whole = _h5_has_model(path)
        except OSError as exc:
            raise InputError(f"{path}: expected a readable HDF5 file, got {exc}") from None
        if whole:
            return LoadedModel(model=load_keras_model(path, options.trust, "Keras .h5 model"),
                               backend="tensorflow")
        if options.model_factory is None:
            raise InputError(
                f"{path}: expected --model package.module:factory to build the architecture, "
                "got an HDF5 file with weights only and no --model"
            )
        model = resolve_factory(options.model_factory, options.model_args)
        keras = require("keras", "tensorflow")
        if not isinstance(model, keras.Model):
            raise InputError(f"expected --model to build a keras.Model, got {type(model).__name__}")
        try:
            model.load_weights(str(path))
        except Exception as exc:  # noqa: BLE001 - mismatched weights become one line
            raise InputError(f"{path}: expected weights matching --model, got "
                             f"{first_line(exc)}") from None
        return LoadedModel(model=model, backend="tensorflow")


LOADERS = (KerasArchiveLoader(), SavedModelLoader(), H5Loader())
