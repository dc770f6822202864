"""Resolve ``--model package.module:factory`` (or ``path/to/file.py:factory``)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from cvcore.errors import InputError


def resolve_factory(spec: str) -> Any:
    """Import and call the factory a spec names; return what it builds."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"expected --model as 'package.module:factory', got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise InputError(f"expected --model file {path} to exist, got no such file")
            name = f"_cvcore_factory_{path.stem}"
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise InputError(f"expected an importable Python file for --model, got {path}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"expected --model module {module_name!r} to be importable, got {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise InputError(f"expected {module_name!r} to define {attr!r}, got no such attribute")
    if not callable(factory):
        return factory
    try:
        return factory()
    except TypeError as exc:
        needs = "a transformers class needs its config: pass the save_pretrained directory, " \
            "or --model transformers:ClassName with a config.json beside the weights; " \
            if module_name == "transformers" else ""
        raise InputError(
            f"expected --model {spec!r} to build the model with no arguments, got "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
            f"{needs}or name a factory function that builds it"
        ) from None
