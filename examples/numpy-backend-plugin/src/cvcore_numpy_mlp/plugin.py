"""The hooks cvcore calls; the ``cvcore`` entry point in ``pyproject.toml`` names this module.

Each hook imports what it registers only when cvcore asks for it, the way a plugin for a
heavy framework must (NumPy is light, but the pattern is the same).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cvcore.hookspecs import hookimpl


@hookimpl
def cvcore_register_backends(register: Callable[[Any], None]) -> None:
    from cvcore_numpy_mlp.backend import NumpyMLPBackend

    register(NumpyMLPBackend())


@hookimpl
def cvcore_register_loaders(register: Callable[[Any], None]) -> None:
    from cvcore_numpy_mlp.loader import NumpyMLPLoader

    register(NumpyMLPLoader())
