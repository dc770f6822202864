"""The one import guard for optional frameworks and libraries.

Every backend, adapter, loader and integration imports its framework through
:func:`require`, inside the function that needs it (never at module import), so that a
missing framework is one line naming the install command instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from cvcore.errors import MissingFrameworkError


def require(module: str, extra: str | None = None, *, install: str | None = None,
            name: str | None = None) -> ModuleType:
    """``module`` imported, or a one-line :class:`~cvcore.errors.MissingFrameworkError`.

    Args:
        module: the module to import (``"torch"``, ``"jax.numpy"``, ``"keras"``).
        extra: the ``cvcore[...]`` extra that installs it; the message then names
            ``pip install 'cvcore[<extra>]'``. Default: the module's top-level name.
        install: a whole install command instead (``"pip install lightning"``), for
            libraries no cvcore extra installs.
        name: what the message calls the missing library; default the module's top-level
            name.

    Raises:
        MissingFrameworkError: the import failed.

    >>> require("json").__name__
    'json'
    >>> try:
    ...     require("no_such_framework_xyz", "torch")
    ... except ImportError as exc:
    ...     print(exc)
    no_such_framework_xyz is required for this but is not installed; install it with: pip install 'cvcore[torch]'
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingFrameworkError(name or top, install or extra or top) from None
