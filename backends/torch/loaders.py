"""PyTorch checkpoint and data loaders: pickled modules, state dicts, ``.pt2`` and safetensors.

Pickles are read with ``weights_only=True``. A whole pickled module is allowed exactly the
classes the file names, and only when each is an importable ``torch.nn.Module`` subclass;
anything else (a function, a class that is not a module) is refused unless the user passes
``--trust``. Nothing from the file runs before that check.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import logging
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cvcore.data_io import ZIP_MAGIC, read_magic
from cvcore.errors import InputError, UntrustedFileError
from cvcore.imports import require
from cvcore.model_factory import resolve_factory
from cvcore.protocols import LoadedModel, LoadOptions

from .export_archive import check_export_archive, load_checked
from .graph_data import GraphDataLoader

#: Keys under which training scripts nest a state dict.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "weights")
#: Prefixes wrappers add to parameter names (DataParallel, Lightning, ...).
PREFIXES = ("module.", "model.", "net.", "_orig_mod.")



def _available() -> bool:
    return importlib.util.find_spec("torch") is not None


def _zip_names(path: Path) -> list[str]:
    if not path.is_file() or not read_magic(path).startswith(ZIP_MAGIC):
        return []
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except zipfile.BadZipFile:
        return []


def is_torch_save(path: Path) -> bool:
    """A ``torch.save`` zip archive (``<name>/data.pkl``)."""
    return any(n.endswith("/data.pkl") or n == "data.pkl" for n in _zip_names(path))


def is_torchscript(path: Path) -> bool:
    """A ``torch.jit.save`` archive (``<name>/constants.pkl`` and compiled ``code/``)."""
    names = _zip_names(path)
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _missing_module(name: str) -> str | None:
    """The top-level module of ``package.module.Class`` when it cannot be found, else ``None``."""
    top = name.rpartition(".")[0].split(".")[0]
    if not top:
        return None
    try:
        return top if importlib.util.find_spec(top) is None else None
    except (ImportError, ValueError):
        return top


def _not_importable(path: Path, module: str, trust: bool) -> InputError:
    """The error for a pickle whose classes live in a module that is not on the path."""
    cause = "" if trust else " (this is not a matter of --trust)"
    return InputError(
        f"{path}: expected the module {module!r} that defines the pickled model to be importable, "
        f"got no module named {module!r}{cause}; add the folder that contains it to PYTHONPATH, "
        "or save a state_dict and pass --model package.module:factory"
    )


def _class_defined_in_source(module: str, qual: str) -> bool:
    """Whether ``module``'s source defines ``class <qual's first part>`` at its top level.

    Read without importing anything: each package level is located with
    :class:`importlib.machinery.PathFinder` (``importlib.util.find_spec`` would import the
    parents) and the module's file is parsed with :mod:`ast`. A module already imported is
    taken as it is. Levels that are not plain Python source (extension modules, namespace
    packages without a file) are not imported on a pickle's word.
    """
    parts = module.split(".")
    if module in sys.modules:
        return True
    search: list[str] | None = None
    spec = None
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        if name in sys.modules:
            search = list(getattr(sys.modules[name], "__path__", []) or [])
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, search)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            return False
        search = list(spec.submodule_search_locations or [])
    if spec is None or spec.origin is None:  # every level imported already
        return True
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return False
    first = qual.split(".")[0]
    return any(isinstance(node, ast.ClassDef) and node.name == first for node in tree.body)


def _resolve(name: str) -> Any:
    """The object a pickle names, or ``None``; a module is imported only if it defines the class.

    Importing runs the module's top-level code, and the file chose the module: so a module
    not imported yet is imported only when its source (read, not run) defines the named class.
    """
    module, _, qual = name.rpartition(".")
    if not module or _missing_module(name) is not None:
        return None
    if not _class_defined_in_source(module, qual):
        return None
    try:
        obj: Any = importlib.import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj


def allowed_globals(path: Path) -> list[Any]:
    """The classes a pickle names, resolved, if every one is an ``nn.Module`` subclass.

    Raises:
        UntrustedFileError: the file names something else (which would run code).
    """
    torch = require("torch")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - a malformed archive, reported in one line
        raise InputError(f"{path}: expected a readable PyTorch checkpoint, got {exc}") from None
    resolved, refused = [], []
    for name in names:
        obj = _resolve(name)
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            resolved.append(obj)
        elif obj is None and (missing := _missing_module(name)) is not None:
            raise _not_importable(path, missing, trust=False)
        else:
            refused.append(name)
    if refused:
        raise UntrustedFileError(
            f"{path}: expected a pickle naming only importable torch.nn.Module classes, got "
            f"{', '.join(refused)}; nothing was run. If you made this file yourself, "
            "pass --trust to load it"
        )
    return resolved


def load_torch_file(path: Path, trust: bool) -> Any:
    """``torch.load`` on the CPU, ``weights_only=True`` unless ``trust``."""
    torch = require("torch")
    if not trust and is_torchscript(path):
        raise UntrustedFileError(
            f"{path}: expected a torch.save checkpoint, got a TorchScript archive, whose "
            "compiled code would run on loading; nothing was run. If you made this file "
            "yourself, pass --trust to load it"
        )
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(allowed_globals(path)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (UntrustedFileError, InputError):
        raise
    except ModuleNotFoundError as exc:
        raise _not_importable(path, (exc.name or str(exc)).split(".")[0], trust=True) from None
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "an unpickling error"
        raise UntrustedFileError(
            f"{path}: expected a checkpoint loadable with weights_only=True, got {first}; "
            "nothing was run. If you made this file yourself, pass --trust to load it"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: expected a readable PyTorch checkpoint, got {first}") from None


def find_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    """The tensor mapping in a loaded object: itself, or nested under a common key."""
    torch = require("torch")

    def is_sd(d: Any) -> bool:
        return isinstance(d, dict) and bool(d) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if is_sd(obj):
        return dict(obj)
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if is_sd(obj.get(key)):
                return dict(obj[key])
        keys = list(obj)[:10]
        raise InputError(
            f"{path}: expected a state_dict, or one under a key among {list(STATE_DICT_KEYS)}, "
            f"got a dict with keys {keys}"
        )
    raise InputError(f"{path}: expected a module or a state_dict, got {type(obj).__name__}")


def load_state_into(module: Any, state: dict[str, Any], path: Path) -> Any:
    """Load a state dict into a factory-built module; missing/unexpected keys are an error."""
    torch = require("torch")
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"expected --model to build a torch.nn.Module, got {type(module).__name__}")
    expected = set(module.state_dict())
    for prefix in ("",) + PREFIXES:
        if prefix and not all(k.startswith(prefix) for k in state):
            continue
        candidate = {k[len(prefix):]: v for k, v in state.items()}
        if set(candidate) == expected:
            state = candidate
            break
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise InputError(
            f"{path}: expected the state_dict to match --model, got missing keys {missing[:8]} "
            f"and unexpected keys {unexpected[:8]}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise InputError(f"{path}: expected tensors shaped like --model's, got {str(exc).splitlines()[-1].strip()}") from None
    return module


def _from_state(options: LoadOptions, state: dict[str, Any], path: Path, missing: str) -> LoadedModel:
    """The ``--model`` factory's module with ``state`` loaded; without ``--model`` an
    error ending in ``missing`` (what was given instead)."""
    if options.model_factory is None:
        raise InputError(f"{path}: expected --model package.module:factory {missing}")
    return LoadedModel(model=load_state_into(resolve_factory(options.model_factory,
                                                             options.model_args), state, path),
                       backend="torch")



@dataclass(frozen=True)
class TorchSaveLoader:
    """``torch.save`` files: a whole module, or a state dict with ``--model``."""

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = "torch-save"
    extra: str = "torch"
    extensions: tuple[str, ...] = (".pt", ".pth", ".ckpt", ".bin")

    def available(self) -> bool:
        return _available()

    def sniff(self, path: Path) -> bool:
        return is_torch_save(path)

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        torch = require("torch")
        if not is_torch_save(path):
            kind = "a directory" if path.is_dir() else "content that is not a torch.save archive"
            raise InputError(f"{path}: expected a PyTorch checkpoint (torch.save zip), got {kind}")
        obj = load_torch_file(path, options.trust)
        if isinstance(obj, torch.nn.Module):
            return LoadedModel(model=obj, backend="torch")
        state = find_state_dict(obj, path)
        return _from_state(options, state, path,
                           f"to build the architecture, got a state_dict ({len(state)} tensors) "
                           "and no --model")


@dataclass(frozen=True)
class ExportLoader:
    """``torch.export`` programs (``.pt2``); their example inputs serve as data.

    Without ``--trust`` the archive is checked first (:mod:`.export_archive`: no pickle,
    no compiled code, only built-in operators in the graph) and read from the checked bytes.
    """

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = "torch-export"
    extra: str = "torch"
    extensions: tuple[str, ...] = (".pt2",)

    def available(self) -> bool:
        return _available()

    def sniff(self, path: Path) -> bool:
        return any(n.endswith("archive_format") for n in _zip_names(path))

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        torch = require("torch")
        if not path.is_file():
            raise InputError(f"{path}: expected a torch.export .pt2 archive, got a directory")
        data = b"" if options.trust else path.read_bytes()
        if not options.trust:
            check_export_archive(data, str(path))  # before torch reads a byte of it
        quiet = logging.getLogger("torch.export")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # torch logs a traceback before raising on bad archives
        try:
            program = (torch.export.load(str(path)) if options.trust
                       else load_checked(data, str(path)))
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - any malformed archive becomes one line
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"{path}: expected a torch.export .pt2 archive, got {first}") from None
        finally:
            quiet.setLevel(level)
        given: tuple[Any, Any] = program.example_inputs or ((), {})
        args: tuple[Any, ...] = tuple(given[0])
        kwargs: dict[str, Any] = dict(given[1])
        example: Any = None
        if kwargs and not args:
            example = dict(kwargs)
        elif len(args) == 1:
            example = args[0]
        elif args:
            example = tuple(args)
        return LoadedModel(model=program, backend="torch", example_inputs=example)


def _is_safetensors(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size < 10:
        return False
    with path.open("rb") as fh:
        head = fh.read(9)
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < length <= path.stat().st_size - 8


@dataclass(frozen=True)
class SafetensorsLoader:
    """safetensors weights with ``--model``."""

    kind: Literal["checkpoint"] = "checkpoint"
    name: str = "safetensors"
    extra: str = "torch,safetensors"
    extensions: tuple[str, ...] = (".safetensors",)

    def available(self) -> bool:
        return _available() and importlib.util.find_spec("safetensors") is not None

    def sniff(self, path: Path) -> bool:
        return _is_safetensors(path)

    def load(self, path: Path, options: LoadOptions) -> LoadedModel:
        if not _is_safetensors(path):
            raise InputError(f"{path}: expected a safetensors file, got other content")
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"{path}: expected a readable safetensors file, got {exc}") from None
        return _from_state(options, state, path, "with safetensors weights, got none")


def refuse_pickled_data(path: Path) -> None:
    """Refuse probe data whose pickle names anything but tensors and containers (a graph
    ``Data``, a NumPy object): data is never unpickled, and ``--trust`` is for models only."""
    torch = require("torch")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - a malformed archive, reported in one line
        raise InputError(f"{path}: expected a readable PyTorch file, got {exc}") from None
    if not names:
        return
    graph = any(n.startswith("torch_geometric.") for n in names)
    hint = ("save the graph as an .npz archive of x and edge_index (numpy.savez; "
            "docs/adapters.md, Graph data files)" if graph
            else "save the inputs as tensors, or as .npy / .npz arrays")
    raise UntrustedFileError(
        f"{path}: expected probe data of tensors (a tensor, or a dict / tuple of tensors), got "
        f"a pickle naming {', '.join(names[:4])}; nothing was run and probe data is never "
        f"unpickled: {hint}")


@dataclass(frozen=True)
class TensorDataLoader:
    """Probe inputs saved with ``torch.save``: a tensor, or a dict / tuple of tensors."""

    kind: Literal["data"] = "data"
    name: str = "torch-tensor"

    def claims(self, spec: str) -> bool:
        path = Path(spec)
        return _available() and path.is_file() and is_torch_save(path)

    def load(self, spec: str, key: str | None) -> Any:
        refuse_pickled_data(Path(spec))
        obj = load_torch_file(Path(spec), trust=False)
        if key is not None:
            if not isinstance(obj, dict) or key not in obj:
                choices = list(obj) if isinstance(obj, dict) else []
                raise InputError(f"{spec}: expected a key among {choices}, got {key!r}")
            return obj[key]
        return obj


LOADERS = (ExportLoader(), TorchSaveLoader(), SafetensorsLoader(), TensorDataLoader(),
           GraphDataLoader())
