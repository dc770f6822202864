"""The JAX backend and its checkpoint loaders (flax msgpack, Orbax, restricted pickle).

This package's ``__init__`` holds the plugin's hooks (the ``jax`` entry point); importing
it imports nothing of JAX, flax or equinox. One job per module, the ground floor first:

* ``setup``: model forms, inputs, outputs, devices, dtypes, parameter leaves;
* ``jaxpr``: the one-sample forward pass traced to a jaxpr, its evaluator, the probe of O;
* ``jacobian``: per-sample Jacobians and the kernel assembled from them;
* ``rules``: the layer rules read off the jaxpr (dense, convolution, embedding sites);
* ``structured``: the kernel from those rules;
* ``diagonal``: ``K_ii`` without the kernel; ``operator``: ``K @ V`` matrix-free;
* ``layers``: each layer's kernel; ``backend``: :class:`JaxBackend`, which dispatches;
* ``loaders``: flax msgpack, Orbax and restricted-pickle checkpoint loaders.

``setup``, ``jaxpr`` and ``jacobian`` never import ``backend``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cvcore.hookspecs import hookimpl


@hookimpl
def cvcore_register_backends(register: Callable[[Any], None]) -> None:
    from cvcore.backends.jax.backend import JaxBackend

    register(JaxBackend())


@hookimpl
def cvcore_register_loaders(register: Callable[[Any], None]) -> None:
    from cvcore.backends.jax import loaders

    for loader in loaders.LOADERS:
        register(loader)
