"""The one import guard (cvcore.imports.require): every optional framework a backend,
adapter, loader, integration or command imports is missing in the same way, one line
naming the install command."""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cvcore.errors import MissingFrameworkError
from cvcore.imports import require
from cvcore.protocols import LoadOptions

ROOT = Path(__file__).resolve().parents[2]


def block(monkeypatch: pytest.MonkeyPatch, top: str) -> None:
    """Make ``import top`` (and of any of its submodules) fail with ImportError."""
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, top, None)


def test_require_returns_the_module() -> None:
    import json

    assert require("json") is json
    assert require("os.path", "torch") is sys.modules["os.path"]


@pytest.mark.parametrize(("args", "kwargs", "framework", "command"), [
    (("nothere_xyz",), {}, "nothere_xyz", "pip install 'cvcore[nothere_xyz]'"),
    (("nothere_xyz.sub", "torch"), {}, "nothere_xyz", "pip install 'cvcore[torch]'"),
    (("nothere_xyz", "jax"), {"name": "orbax-checkpoint"}, "orbax-checkpoint",
     "pip install 'cvcore[jax]'"),
    (("nothere_xyz",), {"install": "pip install lightning"}, "nothere_xyz",
     "pip install lightning"),
], ids=["default-extra", "named-extra", "named-library", "whole-command"])
def test_require_names_the_install_command(args: tuple[str, ...], kwargs: dict[str, str],
                                           framework: str, command: str) -> None:
    with pytest.raises(MissingFrameworkError) as info:
        require(*args, **kwargs)
    assert str(info.value) == (f"{framework} is required for this but is not installed; "
                               f"install it with: {command}")
    assert (info.value.framework, info.value.install) == (framework, command)
    assert isinstance(info.value, ImportError)


def _torch_device() -> Any:
    from cvcore.backends.torch.setup import resolve_device

    return resolve_device(None)


def _torch_checkpoint(tmp: Path) -> Any:
    from cvcore.backends.torch.loaders import LOADERS

    path = tmp / "model.pt"
    path.write_bytes(b"\x80\x02not really a pickle")
    loader = next(ld for ld in LOADERS if ld.name == "torch-save")
    return loader.load(path, LoadOptions())


def _jax_device() -> Any:
    from cvcore.backends.jax.setup import resolve_device

    return resolve_device(None)


def _keras_backend_name() -> Any:
    from cvcore.backends.keras.setup import keras_backend_name

    return keras_backend_name()


def _saved_model(tmp: Path) -> Any:
    from cvcore.backends.keras.loaders import SavedModelLoader

    (tmp / "saved_model.pb").write_bytes(b"")
    return SavedModelLoader().load(tmp, LoadOptions())


def _transformers(tmp: Path) -> Any:
    from cvcore.adapters.huggingface_loaders import load_pretrained

    return load_pretrained(tmp, "BertModel")


def _gymnasium() -> Any:
    from cvcore.adapters.policy_loaders import EnvRolloutLoader

    return EnvRolloutLoader().load_from_model("env:CartPole-v1", object(), samples=2, seed=0)


def _matplotlib() -> Any:
    from cvcore.scaling.figures import pyplot

    return pyplot()


def _pyarrow() -> Any:
    from cvcore.cli.export import _pyarrow

    return _pyarrow()


def _sklearn() -> Any:
    from cvcore.sweep.data import _raw

    return _raw("diabetes")


def _integration() -> Any:
    from cvcore.integrations.common import require as integration_require

    return integration_require("lightning.pytorch", "lightning")


# (what is called, the module made unimportable, the library named, the install command)
GUARDS: list[tuple[Callable[..., Any], str, str, str]] = [
    (_torch_device, "torch", "torch", "pip install 'cvcore[torch]'"),
    (_torch_checkpoint, "torch", "torch", "pip install 'cvcore[torch]'"),
    (_jax_device, "jax", "jax", "pip install 'cvcore[jax]'"),
    (_keras_backend_name, "keras", "keras", "pip install 'cvcore[tensorflow]'"),
    (_saved_model, "tensorflow", "tensorflow", "pip install 'cvcore[tensorflow]'"),
    (_transformers, "transformers", "transformers", "pip install 'cvcore[adapters]'"),
    (_gymnasium, "gymnasium", "gymnasium", "pip install 'cvcore[adapters]'"),
    (_matplotlib, "matplotlib", "matplotlib", "pip install 'cvcore[plot]'"),
    (_pyarrow, "pyarrow", "pyarrow", "pip install 'cvcore[parquet]'"),
    (_sklearn, "sklearn", "scikit-learn", "pip install 'cvcore[data]'"),
    (_integration, "lightning", "lightning", "pip install lightning"),
]


@pytest.mark.parametrize(("call", "module", "framework", "command"), GUARDS,
                         ids=[g[0].__name__.strip("_") for g in GUARDS])
def test_each_guard_names_the_install_command(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, call: Callable[..., Any],
        module: str, framework: str, command: str) -> None:
    block(monkeypatch, module)
    args = (tmp_path,) if call.__code__.co_argcount else ()
    with pytest.raises(MissingFrameworkError) as info:
        call(*args)
    assert str(info.value) == (f"{framework} is required for this but is not installed; "
                               f"install it with: {command}")


def _guards_of_their_own(path: Path) -> list[str]:
    """``try: import X / except ImportError: raise MissingFrameworkError(...)`` blocks: a
    private copy of the guard."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        imports = any(isinstance(s, (ast.Import, ast.ImportFrom)) for s in node.body)
        for handler in node.handlers:
            names = ast.unparse(handler.type) if handler.type is not None else ""
            raises = any(isinstance(s, ast.Raise) and "MissingFrameworkError" in ast.unparse(s)
                         for s in ast.walk(handler))
            if imports and "ImportError" in names and raises:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_module_keeps_a_copy_of_the_guard() -> None:
    files = [p for folder in ("backends", "adapters", "cli", "cvcore")
             for p in (ROOT / folder).rglob("*.py") if p.name != "imports.py"]
    assert len(files) > 50
    copies = [hit for p in files for hit in _guards_of_their_own(p)]
    assert copies == [], f"expected every import guard to be cvcore.imports.require, got {copies}"
