"""Resolve ``--model package.module:factory`` (or ``path/to/file.py:factory``)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from cvcore.errors import InputError


def parse_model_args(text: str | None) -> dict[str, Any] | None:
    """``--model-args``: a JSON object of keyword arguments for the ``--model`` factory.

    >>> parse_model_args('{"width": 32}')
    {'width': 32}
    """
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"expected --model-args as a JSON object such as '{{\"width\": 32}}', "
                         f"got {text!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise InputError(f"expected --model-args as a JSON object of keyword arguments, "
                         f"got a JSON {type(value).__name__}")
    return value


def _call(factory: Any, spec: str, args: dict[str, Any] | None) -> Any:
    """Call the factory with ``args``; a signature that does not fit is a one-line error."""
    kwargs = args or {}
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin without a signature: just call it
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            how = ("pass its arguments as JSON with --model-args '{\"name\": value}', or point "
                   "--model at a file.py:factory that calls it with fixed arguments")
            if spec.rpartition(":")[0] == "transformers":
                how = ("a transformers class needs its config: pass the save_pretrained "
                       "directory, or --model transformers:ClassName with a config.json beside "
                       "the weights; or " + how)
            got = f"keyword arguments {sorted(kwargs)}" if kwargs else "no arguments"
            raise InputError(f"expected --model {spec!r} to be callable with {got}, "
                             f"got {exc}; {how}") from None
    try:
        return factory(**kwargs)
    except (TypeError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"expected --model {spec!r} to build a model, got "
                         f"{type(exc).__name__}: {first}") from None


def resolve_factory(spec: str, args: dict[str, Any] | None = None) -> Any:
    """Import and call the factory a spec names (with ``args`` as keyword arguments);
    return what it builds."""
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
        if args:
            raise InputError(f"expected --model {spec!r} to be callable with --model-args, "
                             f"got a {type(factory).__name__}")
        return factory
    return _call(factory, spec, args)
