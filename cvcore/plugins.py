"""The plugin registry: loads entry points in the ``cvcore`` group lazily, once.

Built-in backends, loaders and adapters register through the same hooks and entry
points a third-party plugin uses. ``CVCORE_PLUGINS`` (a comma list of entry-point names)
restricts which entry points load.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import pluggy

from cvcore import hookspecs
from cvcore.adapter_base import AdapterBase, as_adapter
from cvcore.errors import (
    BackendError,
    CVCoreError,
    InputError,
    MissingFrameworkError,
    ModelError,
    describe,
)
from cvcore.protocols import Backend, CheckpointLoader, DataLoader

ENV_VAR = "CVCORE_PLUGINS"


@dataclass
class Registry:
    """Everything the plugins registered, by name, in registration order."""

    backends: dict[str, Backend] = field(default_factory=dict)
    checkpoint_loaders: dict[str, CheckpointLoader] = field(default_factory=dict)
    data_loaders: dict[str, DataLoader] = field(default_factory=dict)
    adapters: dict[str, AdapterBase] = field(default_factory=dict)


_pm: pluggy.PluginManager | None = None
_registry: Registry | None = None
_blocked: set[str] = set()


def manager() -> pluggy.PluginManager:
    """The plugin manager, with entry points loaded on first use."""
    global _pm
    if _pm is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        wanted = os.environ.get(ENV_VAR)
        allowed = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
        points = sorted(importlib.metadata.entry_points(group=hookspecs.PROJECT),
                        key=lambda ep: not ep.value.startswith("cvcore."))  # built-ins first
        for ep in points:
            if allowed is not None and ep.name not in allowed:
                continue
            if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break cvcore
                warnings.warn(f"cvcore plugin {ep.name!r} ({ep.value}) failed to load: {exc}",
                              stacklevel=2)
                continue
            pm.register(plugin, name=ep.name)
        _pm = pm
    return _pm


def register(plugin: object, name: str | None = None) -> str:
    """Register a plugin object (a module or instance with hook implementations)."""
    global _registry
    registered = manager().register(plugin, name=name)
    _registry = None
    return str(registered)


def unregister(plugin: object) -> None:
    """Remove a plugin registered with :func:`register`."""
    global _registry
    manager().unregister(plugin)
    _registry = None


def _add(table: dict[str, Any], what: str, obj: object) -> None:
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise CVCoreError(f"expected a {what} with a non-empty string 'name', got {describe(obj)}")
    if name in table and table[name] is not obj:
        warnings.warn(f"cvcore: a second {what} named {name!r} ({type(obj).__module__}) is "
                      f"ignored; the first registered ({type(table[name]).__module__}) is kept",
                      stacklevel=3)
        return
    table[name] = obj


def _call(hook: Any, register: Any) -> None:
    """Call a registration hook's implementations in registration order (built-ins first;
    on a name clash the first registration wins)."""
    for impl in hook.get_hookimpls():
        try:
            impl.function(register=register)
        except CVCoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break cvcore
            warnings.warn(f"cvcore plugin {impl.plugin_name!r} failed in {hook.name}: {exc}",
                          stacklevel=3)


def registry() -> Registry:
    """The registry built from every loaded plugin's hooks (built once, cached)."""
    global _registry
    if _registry is None:
        reg = Registry()
        hook = manager().hook
        _call(hook.cvcore_register_backends, lambda b: _add(reg.backends, "backend", b))

        def add_loader(loader: Any) -> None:
            kind = getattr(loader, "kind", None)
            if kind == "checkpoint":
                _add(reg.checkpoint_loaders, "checkpoint loader", loader)
            elif kind == "data":
                _add(reg.data_loaders, "data loader", loader)
            else:
                raise CVCoreError(
                    f"expected a loader with kind 'checkpoint' or 'data', got {kind!r}"
                )

        _call(hook.cvcore_register_loaders, add_loader)
        _call(hook.cvcore_register_adapters,
              lambda a: _add(reg.adapters, "adapter", as_adapter(a) if _named(a) else a))
        _registry = reg
    return _registry


def _named(obj: object) -> bool:
    """Whether ``obj`` has a non-empty string ``name`` (:func:`_add` refuses it otherwise)."""
    name = getattr(obj, "name", None)
    return isinstance(name, str) and bool(name)


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; raises if unknown or not installed."""
    backends = registry().backends
    if name not in backends:
        raise BackendError(
            f"expected a backend name among {sorted(backends)}, got {name!r}"
        )
    backend = backends[name]
    if not backend.available():
        raise MissingFrameworkError(name, install_command(backend))
    return backend


def install_command(plugin: Any) -> str:
    """How to install what a plugin needs: its ``install`` attribute (a full pip
    command, for third-party plugins), else ``pip install 'cvcore[<extra>]'``."""
    custom = getattr(plugin, "install", None)
    if isinstance(custom, str) and custom:
        return custom
    return f"pip install 'cvcore[{getattr(plugin, 'extra', None) or ''}]'"


def select_backend(model: object) -> Backend:
    """Choose the backend for one model object.

    A backend is asked only when one of its framework's modules is already imported
    (a model of that framework cannot exist otherwise), then by its ``isinstance`` test.
    """
    backends = registry().backends
    for backend in backends.values():
        if any(m in sys.modules for m in backend.modules) and backend.accepts(model):
            return backend
    raise BackendError(
        f"expected a model one of the backends {sorted(backends)} accepts, got "
        f"{type(model).__module__}.{type(model).__qualname__}; pass backend= to choose one"
    )


#: ``family=`` value that turns every adapter off (the model is measured as called).
NO_FAMILY = "none"


def family_of(adapter: AdapterBase) -> str:
    """The family name an adapter answers to (its ``family``, by default its ``name``)."""
    return adapter.family


def select_adapter(model: object, family: str | None = None) -> AdapterBase | None:
    """The adapter for ``model``: the first that accepts it by type, or, with ``family``
    named, the first of that family that can measure it (``"none"``: no adapter).

    Raises:
        InputError: ``family`` names no registered family.
        ModelError: no adapter of the named family can measure ``model``.
    """
    adapters = list(registry().adapters.values())
    if family is None:
        return next((a for a in adapters if a.accepts(model)), None)
    if family == NO_FAMILY:
        return None
    named = [a for a in adapters if family_of(a) == family]
    if not named:
        known = sorted({family_of(a) for a in adapters} | {NO_FAMILY})
        raise InputError(f"expected a family among {known}, got {family!r}")
    for adapter in named:
        if adapter.available() and adapter.accepts_family(model):
            return adapter
    missing = [a for a in named if not a.available()]
    if missing:
        raise MissingFrameworkError(missing[0].library or missing[0].name,
                                    install_command(missing[0]))
    wanted = "; or ".join(a.expects for a in named)
    raise ModelError(f"expected a model of the {family!r} family ({wanted}), got "
                     f"{type(model).__module__}.{type(model).__qualname__}")
