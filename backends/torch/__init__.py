"""The PyTorch backend and its checkpoint loaders (``torch.save``, ``torch.export``,
safetensors) and tensor data loader.

This package's ``__init__`` holds the plugin's hooks (the ``torch`` entry point); importing
it does not import torch. One job per module, the ground floor first:

* ``setup``: devices, dtypes, inputs (``as_inputs``), the prepared model, ``forward`` and
  ``probe``; ``prepare`` gives a request's ``Setup`` (model, inputs, ``N``, ``O``);
* ``jacobian``: per-sample Jacobians (``torch.func``) and the kernel assembled from them;
* ``capture``: the ``TorchFunctionMode`` recording the layer uses; ``attention``:
  ``nn.MultiheadAttention`` as recorded projections; ``rules``: the layer identities;
  ``rowcheck``: the checks that a recorded row is one sample's;
* ``structured``: the kernel from those rules;
* ``diagonal``: ``K_ii`` without the kernel; ``operator``: ``K @ V`` matrix-free;
* ``layers``: each layer's kernel; ``backend``: :class:`TorchBackend`, which dispatches;
* ``loaders``: the checkpoint and data loaders.

``setup`` and ``jacobian`` never import ``backend``.
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
