"""The TensorFlow / Keras plugin: backend and checkpoint loaders.

Registered through the ``cvcore`` entry point like any third-party plugin. Importing this
module imports neither TensorFlow nor Keras.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cvcore.hookspecs import hookimpl


@hookimpl
def cvcore_register_backends(register: Callable[[Any], None]) -> None:
    from cvcore.backends.keras.backend import KerasBackend

    register(KerasBackend())


@hookimpl
def cvcore_register_loaders(register: Callable[[Any], None]) -> None:
    from cvcore.backends.keras import loaders

    for loader in loaders.LOADERS:
        register(loader)
