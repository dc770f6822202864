"""Probe inputs: reading arrays, bundled datasets, and fixed random subsets."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from cvcore import plugins
from cvcore.errors import InputError
from cvcore.protocols import TakingBackend

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"
#: The arrays that make an ``.npz`` archive a graph (read by the torch backend's graph
#: data loader, not as plain arrays).
GRAPH_KEYS = ("x.npy", "edge_index.npy")


def read_magic(path: Path, n: int = 8) -> bytes:
    """The first ``n`` bytes of a file, with a clear error for what cannot be read."""
    if not path.exists():
        raise InputError(f"{path}: expected an existing file, got no such file or directory")
    if path.is_dir():
        raise InputError(f"{path}: expected a file, got a directory")
    with path.open("rb") as fh:
        head = fh.read(n)
    if not head:
        raise InputError(f"{path}: expected a non-empty file, got an empty one")
    return head


def open_npz(path: Path, key: str | None) -> NDArray[Any]:
    """One array of an ``.npz`` archive: ``key``, or the only array in it."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            if key is None:
                if len(names) != 1:
                    raise InputError(
                        f"{path}: expected --key naming one of the arrays {names}, got none"
                    )
                key = names[0]
            if key not in names:
                raise InputError(f"{path}: expected a key among {names}, got {key!r}")
            member = key if key in archive.zip.namelist() else f"{key}.npy"
            with archive.zip.open(member) as fh:
                check_npy_header(fh, archive.zip.getinfo(member).file_size, f"{path}[{key}]")
            return np.asarray(archive[key])
    except InputError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(f"{path}: expected a readable .npz archive, got {exc}") from None
    except ValueError as exc:
        raise InputError(f"{path}: expected arrays without pickled objects, got {exc}") from None


def check_npy_header(fh: Any, available: int, source: str) -> None:
    """Read a ``.npy`` header from ``fh`` and refuse, before anything is allocated, an array
    whose claimed size exceeds the ``available`` bytes (file size) or that holds objects."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fh)
        else:
            shape, _, dtype = fmt.read_array_header_2_0(fh)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as exc:
        raise InputError(f"{source}: expected a readable .npy header, got {exc}") from None
    if dtype.hasobject:
        raise InputError(f"{source}: expected a numeric .npy array, got one of Python objects "
                         "(pickled; refused)")
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    remaining = available - fh.tell()
    if claimed > remaining:
        raise InputError(f"{source}: expected the {remaining} bytes after the .npy header to "
                         f"hold the array it declares, got a header declaring shape {shape} "
                         f"of {dtype} ({claimed} bytes)")


def open_npy(path: Path) -> NDArray[Any]:
    """A ``.npy`` array, refusing pickled object arrays and headers that claim more data
    than the file holds."""
    try:
        with path.open("rb") as fh:
            check_npy_header(fh, path.stat().st_size, str(path))
        return np.asarray(np.load(path, allow_pickle=False))
    except InputError:
        raise
    except (OSError, EOFError) as exc:
        raise InputError(f"{path}: expected a readable .npy array, got {exc}") from None
    except ValueError as exc:
        raise InputError(f"{path}: expected a numeric .npy array, got {exc}") from None


@dataclass(frozen=True)
class NumpyDataLoader:
    """``.npy`` and ``.npz`` files, recognised by content first, extension second."""

    kind: Literal["data"] = "data"
    name: str = "numpy"

    def claims(self, spec: str) -> bool:
        path = Path(spec)
        if path.is_file():
            head = read_magic(path)
            if head.startswith(NPY_MAGIC):
                return True
            if head.startswith(ZIP_MAGIC):
                try:
                    with zipfile.ZipFile(path) as zf:
                        names = zf.namelist()
                except (zipfile.BadZipFile, OSError, EOFError):
                    return False
                return (bool(names) and all(n.endswith(".npy") for n in names)
                        and not all(k in names for k in GRAPH_KEYS))
        return path.suffix.lower() in (".npy", ".npz")

    def load(self, spec: str, key: str | None) -> Any:
        path = Path(spec)
        head = read_magic(path)
        if head.startswith(NPY_MAGIC):
            return open_npy(path)
        return open_npz(path, key)


def read_kernel(path: Path, key: str | None = None) -> NDArray[Any]:
    """A kernel matrix from a ``.npy`` file or one array of an ``.npz`` file."""
    head = read_magic(path)
    if head.startswith(NPY_MAGIC):
        return open_npy(path)
    if head.startswith(ZIP_MAGIC):
        return open_npz(path, key)
    raise InputError(
        f"{path}: expected a kernel in a .npy or .npz file, got content of another format"
    )


#: Datasets shipped inside the package: name -> (file, scale to put features in [0, 1]).
BUNDLED = {
    "digits": ("digits.npz", 1.0 / 16.0),  # 1797 8×8 handwritten digits (UCI), 64 features
    "iris": ("iris.npz", 1.0),  # 150 iris flowers (Fisher), 4 features
}


@dataclass(frozen=True)
class BundledDataLoader:
    """Real datasets shipped with cvcore (no download): ``digits``, ``iris``."""

    kind: Literal["data"] = "data"
    name: str = "bundled"

    def claims(self, spec: str) -> bool:
        return spec in BUNDLED and not Path(spec).exists()

    def load(self, spec: str, key: str | None) -> Any:
        return load_bundled(spec)[0]


def load_bundled(name: str) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """A bundled dataset's features (float32, scaled to [0, 1]) and integer labels."""
    if name not in BUNDLED:
        raise InputError(f"expected a bundled dataset among {sorted(BUNDLED)}, got {name!r}")
    filename, scale = BUNDLED[name]
    with (resources.files("cvcore").joinpath("data", filename).open("rb") as fh,
          np.load(fh) as archive):
        x = (archive["data"].astype(np.float32) * np.float32(scale))
        y = archive["target"].astype(np.int64)
    return x, y


def _claiming(spec: str) -> Any | None:
    return next((ld for ld in plugins.registry().data_loaders.values() if ld.claims(spec)), None)


def data_loader_for(spec: str) -> Any | None:
    """The first registered data loader that claims ``spec`` (each loader is asked once),
    or ``None``; pass it to :func:`load_data` so the loaders are not asked again."""
    return _claiming(spec)


def needs_model(loader: Any | None) -> bool:
    """Whether ``loader`` (from :func:`data_loader_for`) makes its inputs from a model (a data
    loader with ``needs_model = True``, such as ``env:`` policy roll-outs)."""
    return bool(getattr(loader, "needs_model", False))


def load_data(spec: str, key: str | None = None, *, model: Any = None,
              samples: int | None = None, seed: int = 0, family: str | None = None,
              loader: Any | None = None) -> Any:
    """Read probe inputs with the first data loader that claims ``spec``.

    A loader with ``needs_model = True`` makes them from ``model`` with its
    ``load_from_model(spec, model, samples=, seed=, family=)`` (exactly ``samples``
    inputs, reproducible from ``seed``). ``loader``: the one :func:`data_loader_for` found,
    so the loaders are asked once.
    """
    loaders = plugins.registry().data_loaders
    if loader is None:
        loader = _claiming(spec)
    if loader is not None:
        if getattr(loader, "needs_model", False):
            if model is None:
                raise InputError(f"{spec}: expected a model to make these inputs from, got none")
            return loader.load_from_model(spec, model, samples=samples, seed=seed, family=family)
        return loader.load(spec, key)
    path = Path(spec)
    if path.exists() or any(c in spec for c in "/\\."):
        read_magic(path)  # missing / empty / directory errors first
        raise InputError(
            f"{spec}: expected a data file in a known format (loaders: {sorted(loaders)}), "
            f"got one none of them recognises"
        )
    raise InputError(
        f"expected --data to be a file or a bundled dataset among {sorted(BUNDLED)}, got {spec!r}"
    )


@runtime_checkable
class SampleContainer(Protocol):
    """An adapter whose family has inputs that are not arrays with a batch axis (a graph
    whose nodes are the samples, a list of graphs): it counts and takes their samples.

    :func:`batch_size` and :func:`take` ask every registered adapter that has these two
    methods before reading a ``shape``; ``count_samples`` answers ``None`` for inputs
    that are not its family's (cheaply: without importing its library).
    """

    def count_samples(self, inputs: Any) -> int | None:
        """The number of samples in ``inputs``, or ``None`` when they are not this
        family's inputs."""

    def take_samples(self, inputs: Any, index: NDArray[np.int64]) -> Any:
        """Samples ``index`` of ``inputs`` (inputs this family counted), as inputs of the
        same kind."""


def sample_container(inputs: Any) -> SampleContainer | None:
    """The registered adapter that counts the samples of ``inputs`` (``None`` for arrays,
    tensors, and dicts or tuples of them)."""
    if isinstance(inputs, (np.ndarray, dict, str, bytes)):
        return None
    for adapter in plugins.registry().adapters.values():
        if isinstance(adapter, SampleContainer) and adapter.count_samples(inputs) is not None:
            return adapter
    return None


def batch_size(inputs: Any) -> int:
    """The number of samples in inputs given as an array or a dict / tuple of arrays (or
    inputs an adapter counts, :class:`SampleContainer`: nodes of a graph, graphs)."""
    container = sample_container(inputs)
    if container is not None:
        count = container.count_samples(inputs)
        assert count is not None
        return count
    if isinstance(inputs, dict):
        sizes = {batch_size(v) for v in inputs.values()}
    elif isinstance(inputs, (tuple, list)):
        sizes = {batch_size(v) for v in inputs}
    else:
        shape = getattr(inputs, "shape", None)
        if shape is None or len(shape) == 0:
            raise InputError(
                f"expected inputs with a batch dimension, got {type(inputs).__name__}"
            )
        return int(shape[0])
    if len(sizes) != 1:
        raise InputError(f"expected every input to have the same batch size, got {sorted(sizes)}")
    return sizes.pop()


def require_samples(n: int) -> None:
    """Refuse an empty batch (every backend and the probe subset say it this way).

    >>> require_samples(0)
    Traceback (most recent call last):
    ...
    cvcore.errors.InputError: expected at least one input sample, got an empty batch
    """
    if n == 0:
        raise InputError("expected at least one input sample, got an empty batch")


def take(inputs: Any, index: NDArray[np.int64], backend: Any = None) -> Any:
    """Select samples ``index`` (along the first axis) from every array in ``inputs``:
    a framework tensor through ``backend``'s ``take`` (:class:`cvcore.protocols.TakingBackend`),
    else by a list of ints. Inputs an adapter counts (:class:`SampleContainer`) are taken
    by that adapter."""
    container = sample_container(inputs)
    if container is not None:
        return container.take_samples(inputs, np.asarray(index, dtype=np.int64))
    if isinstance(inputs, dict):
        return {k: take(v, index, backend) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(take(v, index, backend) for v in inputs)
    if isinstance(inputs, np.ndarray):
        return inputs[index]
    if isinstance(backend, TakingBackend):
        return backend.take(inputs, index)
    return inputs[index.tolist()]  # framework tensors accept a list of ints


def slice_inputs(inputs: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every array in ``inputs`` (an array or a dict / tuple)."""
    if isinstance(inputs, dict):
        return {k: slice_inputs(v, start, stop) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(slice_inputs(v, start, stop) for v in inputs)
    return inputs[start:stop]


def probe_subset(inputs: Any, samples: int | None, seed: int = 0) -> Any:
    """A fixed random subset of ``samples`` inputs; the same seed gives the same subset.

    The subset depends only on the number of inputs, ``samples`` and ``seed``, so every
    checkpoint of a run is measured on one probe set.
    """
    n = batch_size(inputs)
    require_samples(n)
    if samples is None:
        return inputs
    if samples < 1 or samples > n:
        raise InputError(f"expected --samples between 1 and {n}, got {samples}")
    index = np.sort(np.random.default_rng(seed).choice(n, size=samples, replace=False))
    return take(inputs, index)
