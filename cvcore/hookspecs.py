"""The hooks a cvcore plugin implements. Built-in backends use exactly these."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "cvcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def cvcore_register_backends(register: Callable[[Any], None]) -> None:
    """Register backends: call ``register(backend)`` once per :class:`cvcore.protocols.Backend`."""


@hookspec
def cvcore_register_loaders(register: Callable[[Any], None]) -> None:
    """Register checkpoint and data loaders (:class:`cvcore.protocols.CheckpointLoader`,
    :class:`cvcore.protocols.DataLoader`): call ``register(loader)`` once per loader."""


@hookspec
def cvcore_register_adapters(register: Callable[[Any], None]) -> None:
    """Register adapters (:class:`cvcore.protocols.Adapter`) for model families."""


@hookspec
def cvcore_register_commands(app: Any) -> None:
    """Add sub-commands to the ``cv`` Typer application ``app``."""
