"""The PyTorch plugin: backend, checkpoint loaders and a tensor data loader.

Registered through the ``cvcore`` entry point like any third-party plugin. Importing this
module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cvcore.hookspecs import hookimpl


@hookimpl
def cvcore_register_backends(register: Callable[[Any], None]) -> None:
    from cvcore.backends.torch.backend import TorchBackend

    register(TorchBackend())


@hookimpl
def cvcore_register_loaders(register: Callable[[Any], None]) -> None:
    from cvcore.backends.torch import loaders

    for loader in loaders.LOADERS:
        register(loader)
