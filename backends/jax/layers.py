"""The kernel split by layer (``per_layer=True``) for JAX: one kernel per layer.

A layer is the module that owns a parameter: the parameter's tree path without its last
key, keys joined by ``.`` (:func:`layer_names`), as PyTorch names its modules. So
``Dense_0`` for a flax linen model's ``{'Dense_0': {'kernel', 'bias'}}`` (the ``params``
collection is not part of the path), ``block.mlp`` one level deeper, ``layers.0`` for an
Equinox ``layers[0].weight``, ``l1`` for a flax nnx ``self.l1 = nnx.Linear(...)`` (the
``nnx.Param`` holding the array is the parameter, its ``.value`` no key of the path) and
``(root)`` for parameters at the top of the tree. Each layer's kernel is the backend's
kernel with only that layer's leaves trainable (the structured path where it applies,
else the Jacobian path), so a model with L layers costs about L kernel calls, each
compiled once.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from cvcore.imports import require
from cvcore.protocols import KernelRequest, LayerKernel, LayerKernels

from .forms import Leaves, tree_path
from .setup import device_name, prepare, resolve_device, scope
from .structured import kernel_of


def layer_of_keys(keys: list[str]) -> str:
    """The layer of a parameter whose tree path has ``keys``: all but the last, joined by
    ``.``.

    >>> layer_of_keys(["Dense_0", "kernel"]), layer_of_keys(["layers", "0", "weight"])
    ('Dense_0', 'layers.0')
    >>> layer_of_keys(["w1"])
    '(root)'
    """
    return ".".join(keys[:-1]) if len(keys) > 1 else "(root)"


def _is_variable(value: Any) -> bool:
    """A flax nnx ``Variable`` (``nnx.Param``): one parameter, its array under ``.value``."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(value, nnx.Variable)


def layer_names(params: Any, leaves: Leaves) -> list[str]:
    """The layer of every leaf of ``params`` (flattened as ``leaves``), by
    :func:`layer_of_keys` on its path up to the parameter: a flax nnx ``Variable`` is the
    parameter, the keys inside it (``.value``) are not part of the path."""
    jax = require("jax")
    names: list[str] = []
    for path, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]:
        keys = tree_path(jax.tree_util.keystr(path))
        names += [layer_of_keys(keys)] * len(jax.tree_util.tree_leaves(node))
    if len(names) != len(leaves.values):  # a node whose leaves are not the flattened ones
        names = [layer_of_keys(tree_path(p)) for p in leaves.paths]
    return names


def layer_kernels(model: Any, inputs: Any, request: KernelRequest) -> LayerKernels:
    """What ``JaxBackend.layer_kernels`` returns (see the module doc)."""
    device = resolve_device(request.device)
    with scope(request, device):
        return _layer_kernels(model, inputs, request, device)


def _layer_kernels(model: Any, inputs: Any, request: KernelRequest, device: Any) -> LayerKernels:
    s = prepare(model, inputs, request, device, request.train)
    prep, leaves, x, n, n_outputs = s.prep, s.leaves, s.x, s.n, s.n_outputs
    names = layer_names(prep.params, leaves)
    groups: dict[str, list[int]] = {}
    for i in leaves.trainable:
        groups.setdefault(names[i], []).append(i)
    layers = []
    for name, index in groups.items():
        sub = dataclasses.replace(leaves, trainable=index)
        prep.traced = None  # the trace depends on which leaves are trainable
        kernel = kernel_of(prep, sub, x, request, n_outputs)
        layers.append(LayerKernel(name=name, kernel=kernel,
                                  n_params=sum(int(leaves.values[i].size) for i in index)))
    return LayerKernels(layers=tuple(layers), n_samples=n, n_outputs=n_outputs,
                        device=device_name(device))
