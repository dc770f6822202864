"""The hooks a cvcore plugin implements. Built-in backends use exactly these."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

from cvcore.protocols import Adapter, Backend, CheckpointLoader, DataLoader

if TYPE_CHECKING:
    import typer

PROJECT = "cvcore"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def cvcore_register_backends(register: Callable[[Backend], None]) -> None:
    """Register backends: call ``register(backend)`` once per :class:`cvcore.protocols.Backend`."""


@hookspec
def cvcore_register_loaders(register: Callable[[CheckpointLoader | DataLoader], None]) -> None:
    """Register checkpoint and data loaders (:class:`cvcore.protocols.CheckpointLoader`,
    :class:`cvcore.protocols.DataLoader`): call ``register(loader)`` once per loader."""


@hookspec
def cvcore_register_adapters(register: Callable[[Adapter], None]) -> None:
    """Register adapters (:class:`cvcore.protocols.Adapter`) for model families; subclass
    :class:`cvcore.adapter_base.AdapterBase` for the optional members' defaults."""


@hookspec
def cvcore_register_commands(app: typer.Typer) -> None:
    """Add sub-commands to the ``cv`` Typer application ``app``."""
