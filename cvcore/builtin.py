"""cvcore's own plugin: data loaders for NumPy files and the bundled datasets.

It registers through the same hooks and entry point a third-party plugin uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cvcore.data_io import BundledDataLoader, NumpyDataLoader
from cvcore.hookspecs import hookimpl


@hookimpl
def cvcore_register_loaders(register: Callable[[Any], None]) -> None:
    register(NumpyDataLoader())
    register(BundledDataLoader())
