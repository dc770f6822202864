"""JAX checkpoint loaders: flax msgpack files, Orbax directories, parameter-tree pickles.

Each needs ``--model module:factory`` (or ``file.py:factory``) to build the architecture
in one of the JAX backend's forms; the file's arrays replace the factory's, matched by
path (``params/Dense_0/kernel``), and every array must be present with the same shape.

Pickles are read with :class:`RestrictedUnpickler`, which builds NumPy arrays, builtin
containers and a few verified jax / flax state containers, and refuses every other name
a pickle mentions before anything runs. ``--trust`` (a file the user made) lifts that.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cvcore.errors import InputError, UntrustedFileError, first_line
from cvcore.imports import require
from cvcore.model_factory import resolve_factory
from cvcore.protocols import LoadedModel, LoadOptions

#: The first object of a legacy (non-zip) ``torch.save`` file.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
#: Files an Orbax checkpoint directory holds (any one identifies it).
ORBAX_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "checkpoint")


def _available(module: str = "jax") -> bool:
    return importlib.util.find_spec(module) is not None


def _head(path: Path, n: int = 8) -> bytes:
    if not path.is_file():
        return b""
    with path.open("rb") as fh:
        return fh.read(n)


# --------------------------------------------------------------------------- restricted pickle


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """NumPy's array and scalar reconstructors under both their numpy 1 and 2 names."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            table[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "str",
             "bytes", "bytearray", "bool")


def _jax_array(fun: Any, args: Any, arr_state: Any, aval_state: Any) -> np.ndarray:
    """Stand-in for ``jax._src.array._reconstruct_array``: the NumPy array only, and only
    from NumPy's own reconstructor (the original would call whatever ``fun`` names)."""
    if fun not in _numpy_globals().values():
        raise UntrustedFileError(f"expected a jax array built by NumPy, got a call to {fun!r}")
    value = fun(*args)
    value.__setstate__(arr_state)
    return np.asarray(value)


def _frozen_dict(mapping: Any = (), *args: Any) -> dict[Any, Any]:
    """Stand-in for ``flax.core.FrozenDict``: a plain dict of the same items."""
    return dict(mapping)


def _nnx_class(module: str, name: str) -> Any:
    """A flax.nnx state container class the pickle names, if it is one (verified)."""
    if not (module.startswith("flax.nnx.") and _available("flax")):
        return None
    import importlib

    from flax import nnx

    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None
    if isinstance(obj, type) and (issubclass(obj, nnx.Variable) or obj is nnx.State):
        return obj
    if module == "flax.nnx.tracers" and name == "TraceState":
        return obj
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays, builtin containers and jax / flax state containers only.

    Allowed: NumPy's array, dtype and scalar reconstructors; ``builtins`` containers and
    numbers; ``collections.OrderedDict``; ``_codecs.encode`` (protocol 2 bytes); ``jax`` arrays (rebuilt as NumPy arrays);
    ``flax.core.FrozenDict`` (rebuilt as a dict); ``flax.nnx`` ``State`` and ``Variable``
    subclasses. Any other name raises :class:`UntrustedFileError` before it is called.
    """

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = _numpy_globals()
        if (module, name) in allowed:
            return allowed[(module, name)]
        if module == "builtins" and name in _BUILTINS:
            import builtins

            return getattr(builtins, name)
        if (module, name) == ("_codecs", "encode"):  # protocol 2 writes bytes this way
            import codecs

            return codecs.encode
        if (module, name) == ("collections", "OrderedDict"):
            from collections import OrderedDict

            return OrderedDict
        if (module, name) == ("jax._src.array", "_reconstruct_array"):
            return _jax_array
        if (module, name) == ("flax.core.frozen_dict", "FrozenDict"):
            return _frozen_dict
        nnx_class = _nnx_class(module, name)
        if nnx_class is not None:
            return nnx_class
        raise UntrustedFileError(
            f"{self.source}: expected a pickle of arrays and containers only, got a reference "
            f"to {module}.{name}; nothing was run. If you made this file yourself, pass --trust "
            "to load it"
        )


def restricted_loads(data: bytes, source: str = "pickle") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), source).load()


def is_pickle(path: Path) -> bool:
    """A pickle of protocol 2 or later (``\\x80`` then the protocol number)."""
    head = _head(path, 2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def read_pickle(path: Path, trust: bool) -> Any:
    """Unpickle a file: restricted, or unrestricted when the user trusts it."""
    data = path.read_bytes()
    try:
        obj = pickle.loads(data) if trust else restricted_loads(data, str(path))
    except UntrustedFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed pickle becomes one line
        raise InputError(f"{path}: expected a readable pickle, got {first_line(exc)}") from None
    if isinstance(obj, int) and obj == TORCH_LEGACY_MAGIC:
        raise InputError(
            f"{path}: expected a pickled parameter tree, got a legacy torch.save file; "
            "re-save it with a current torch.save to measure it with the torch backend"
        )
    return obj


# --------------------------------------------------------------------------- restoring


def pure_tree(obj: Any) -> Any:
    """Plain nested dicts / lists of arrays from nnx State, Variables and FrozenDicts."""
    nnx = _nnx_module()
    if nnx is not None:
        if isinstance(obj, nnx.State):
            return pure_tree(_to_pure_dict(nnx, obj))
        if isinstance(obj, nnx.Variable):
            return pure_tree(obj.get_value() if hasattr(obj, "get_value") else obj.value)
    if isinstance(obj, Mapping):
        return {str(k): pure_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [pure_tree(v) for v in obj]
    return obj


def _to_pure_dict(nnx: Any, state: Any) -> Any:
    """``nnx.to_pure_dict`` where flax has it (0.11+), else the ``State`` method."""
    convert = getattr(nnx, "to_pure_dict", None)
    return convert(state) if convert is not None else state.to_pure_dict()


def _nnx_module() -> Any:
    import sys

    return sys.modules.get("flax.nnx")


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def flat_arrays(tree: Any) -> dict[str, Any]:
    """``"a/b/0"`` → array for every array leaf of a pytree."""
    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            out["/".join(_key_name(k) for k in path)] = leaf
    return out


def fill(template: Any, state: Any, path: Path, optional: frozenset[str] = frozenset()) -> Any:
    """``template`` with each array leaf replaced by the file's array at the same path.

    Paths in ``optional`` (random-number state) keep the template's value when the file
    lacks them; every other array must be in the file, with the template's shape.
    """
    import jax

    wanted = flat_arrays(template)

    def matches(candidate: Any) -> bool:
        have = set(flat_arrays(candidate))
        return set(wanted) - optional <= have <= set(wanted)

    candidates = [state]
    if isinstance(state, Mapping) and isinstance(state.get("params"), Mapping):
        candidates.append(state["params"])
    candidates.append({"params": state})
    found = next((c for c in candidates if matches(c)), None)
    if found is None:
        have = flat_arrays(state)
        missing = sorted(set(wanted) - set(have))
        unexpected = sorted(set(have) - set(wanted))
        raise InputError(
            f"{path}: expected the arrays of --model, got missing {missing[:8]} and "
            f"unexpected {unexpected[:8]}"
        )
    arrays = flat_arrays(found)
    wanted = {k: v for k, v in wanted.items() if k in arrays}
    for key, ref in wanted.items():
        if tuple(arrays[key].shape) != tuple(ref.shape):
            raise InputError(
                f"{path}: expected {key} of shape {tuple(ref.shape)} as in --model, "
                f"got {tuple(arrays[key].shape)}"
            )

    def replace(key_path: Any, leaf: Any) -> Any:
        key = "/".join(_key_name(k) for k in key_path)
        return np.asarray(arrays[key]) if key in wanted else leaf

    return jax.tree_util.tree_map_with_path(replace, template)


def restore(template: Any, state: Any, path: Path) -> Any:
    """Put a file's parameter tree into the model the factory built."""
    from .forms import model_form

    state = pure_tree(state)
    form = model_form(template)
    if form == "pair":
        return (template[0], fill(template[1], state, path))
    if form == "linen":
        module, variables = template if isinstance(template, tuple) else template.unbind()
        return (module, fill(dict(variables), state, path))
    if form == "nnx":
        from flax import nnx

        graph_state = nnx.state(template)
        rng_paths = frozenset(flat_arrays(_to_pure_dict(nnx, nnx.state(template, nnx.RngState))))
        filled = fill(_to_pure_dict(nnx, graph_state), state, path, rng_paths)
        nnx.replace_by_pure_dict(graph_state, filled)
        nnx.update(template, graph_state)
        return template
    if form == "equinox":
        import equinox as eqx

        arrays, static = eqx.partition(template, eqx.is_array)
        return eqx.combine(fill(arrays, state, path), static)
    raise InputError(
        "expected --model to build (apply_fn, params), (flax.linen module, variables), a "
        f"flax.nnx module or an equinox module, got {type(template).__name__}"
    )


def _factory_model(path: Path, options: LoadOptions, what: str) -> Any:
    if options.model_factory is None:
        raise InputError(
            f"{path}: expected --model module:factory to build the architecture for {what}, "
            "got no --model"
        )
    return resolve_factory(options.model_factory, options.model_args)


# --------------------------------------------------------------------------- loaders


def is_msgpack_map(path: Path) -> bool:
    """A msgpack map with a string first key (what ``flax.serialization`` writes)."""
    head = _head(path, 8)
    if len(head) < 2:
        return False
    first = head[0]
    if 0x81 <= first <= 0x8F:
        key_at = 1
    elif first == 0xDE:
        key_at = 3
    elif first == 0xDF:
        key_at = 5
    else:
        return False
    if len(head) <= key_at:
        return False
    marker = head[key_at]
    return 0xA0 <= marker <= 0xBF or marker in (0xD9, 0xDA, 0xDB)


@dataclass(frozen=True)
class FlaxMsgpackLoader:
    """``flax.serialization.to_bytes`` / ``msgpack_serialize`` files, with ``--model``."""

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = "flax-msgpack"
    extra: str = "jax"
    extensions: tuple[str, ...] = (".msgpack", ".flax")

    def available(self) -> bool:
        return _available("flax")

    def sniff(self, path: Path) -> bool:
        return is_msgpack_map(path)

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        require("jax")  # model_form looks for jax in sys.modules
        if not path.is_file():
            raise InputError(f"{path}: expected a flax msgpack file, got a directory")
        from flax import serialization

        try:
            state = serialization.msgpack_restore(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - a malformed file becomes one line
            raise InputError(f"{path}: expected a readable flax msgpack file, got {first_line(exc)}") from None
        if not isinstance(state, Mapping):
            raise InputError(f"{path}: expected a msgpack map of arrays, got {type(state).__name__}")
        model = _factory_model(path, options, "flax msgpack weights")
        return LoadedModel(model=restore(model, state, path), backend="jax")


def orbax_item(path: Path) -> Path | None:
    """The directory of an Orbax checkpoint: ``path``, or its one item sub-directory."""
    if not path.is_dir():
        return None
    if any((path / m).exists() for m in ORBAX_MARKERS):
        return path
    items = [d for d in path.iterdir() if d.is_dir() and any((d / m).exists() for m in ORBAX_MARKERS)]
    return items[0] if len(items) == 1 else None


@dataclass(frozen=True)
class OrbaxLoader:
    """Orbax checkpoint directories (``StandardCheckpointer``, a manager's step), with ``--model``."""

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = "orbax"
    extra: str = "jax"
    extensions: tuple[str, ...] = ()

    def available(self) -> bool:
        return _available("orbax") and _available("jax")

    def sniff(self, path: Path) -> bool:
        return orbax_item(path) is not None

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        require("jax")  # model_form looks for jax in sys.modules
        item = orbax_item(path)
        if item is None:
            raise InputError(f"{path}: expected an Orbax checkpoint directory, got no Orbax metadata")
        ocp = require("orbax.checkpoint", "jax", name="orbax-checkpoint")
        try:
            state = ocp.StandardCheckpointer().restore(item.resolve())
        except Exception as exc:  # noqa: BLE001 - a malformed checkpoint becomes one line
            raise InputError(f"{path}: expected a readable Orbax checkpoint, got {first_line(exc)}") from None
        model = _factory_model(path, options, "Orbax weights")
        return LoadedModel(model=restore(model, state, path), backend="jax")


@dataclass(frozen=True)
class PickleTreeLoader:
    """A pickled parameter tree (dicts, lists, NumPy / jax arrays, flax containers).

    Read with :class:`RestrictedUnpickler` unless ``--trust``; with ``--trust`` a pickle of
    a whole model in an accepted form is measured as is, without ``--model``.
    """

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = "jax-pickle"
    extra: str = "jax"
    extensions: tuple[str, ...] = (".pkl", ".pickle")

    def available(self) -> bool:
        return _available("jax")

    def sniff(self, path: Path) -> bool:
        return is_pickle(path)

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        require("jax")  # model_form looks for jax in sys.modules
        if not is_pickle(path):
            raise InputError(f"{path}: expected a pickle (protocol 2 or later), got other content")
        obj = read_pickle(path, options.trust)
        from .forms import model_form

        if options.model_factory is None and model_form(obj) is not None:
            return LoadedModel(model=obj, backend="jax")
        model = _factory_model(path, options, "a pickled parameter tree")
        return LoadedModel(model=restore(model, obj, path), backend="jax")


LOADERS = (FlaxMsgpackLoader(), OrbaxLoader(), PickleTreeLoader())
