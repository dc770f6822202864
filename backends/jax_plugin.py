"""The JAX plugin: backend and checkpoint loaders (flax msgpack, Orbax, restricted pickle).

Registered through the ``cvcore`` entry point like any third-party plugin. Importing this
module imports nothing of JAX, flax or equinox.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cvcore.hookspecs import hookimpl


@hookimpl
def cvcore_register_backends(register: Callable[[Any], None]) -> None:
    from cvcore.backends.jax_backend import JaxBackend

    register(JaxBackend())


@hookimpl
def cvcore_register_loaders(register: Callable[[Any], None]) -> None:
    from cvcore.backends import jax_loaders

    for loader in jax_loaders.LOADERS:
        register(loader)
