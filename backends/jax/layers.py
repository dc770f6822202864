"""The kernel split by layer (``per_layer=True``) for JAX: one kernel per subtree.

A layer is a parameter leaf's tree path without its last key, keys joined by ``/``
(``Dense_0`` for a flax model's ``{'Dense_0': {'kernel', 'bias'}}``, ``block/mlp`` one
level deeper, ``layers/0`` for an Equinox ``layers[0].weight``). Each layer's kernel is the backend's kernel with only that layer's
leaves trainable (the structured path where it applies, else the Jacobian path), so a
model with L layers costs about L kernel calls, each compiled once.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from cvcore.backends.jax.jacobian import prepare_request
from cvcore.backends.jax.setup import device_name, resolve_device, scope
from cvcore.backends.jax.structured import kernel_of

from cvcore.protocols import KernelRequest, LayerKernel, LayerKernels

_KEY = re.compile(r"\['([^']*)'\]|\[\"([^\"]*)\"\]|\[(-?\d+)\]|\.(\w+)")


def tree_path(keystr: str) -> list[str]:
    """The keys of a ``jax.tree_util.keystr`` path.

    >>> tree_path("['params']['Dense_0']['kernel']"), tree_path(".layers[0].weight")
    (['params', 'Dense_0', 'kernel'], ['layers', '0', 'weight'])
    """
    return [next(g for g in m.groups() if g is not None) for m in _KEY.finditer(keystr)]


def layer_name(keystr: str) -> str:
    keys = tree_path(keystr)
    return "/".join(keys[:-1]) if len(keys) > 1 else "(root)"


def layer_kernels(model: Any, inputs: Any, request: KernelRequest) -> LayerKernels:
    """What ``JaxBackend.layer_kernels`` returns (see the module doc)."""
    device = resolve_device(request.device)
    with scope(request, device):
        return _layer_kernels(model, inputs, request, device)


def _layer_kernels(model: Any, inputs: Any, request: KernelRequest, device: Any) -> LayerKernels:
    s = prepare_request(model, inputs, request, device, request.train)
    prep, leaves, x, n, n_outputs = s.prep, s.leaves, s.x, s.n, s.n_outputs
    groups: dict[str, list[int]] = {}
    for i in leaves.trainable:
        groups.setdefault(layer_name(leaves.paths[i]), []).append(i)
    layers = []
    for name, index in groups.items():
        sub = dataclasses.replace(leaves, trainable=index)
        prep.traced = None  # the trace depends on which leaves are trainable
        kernel = kernel_of(prep, sub, x, request, n_outputs)
        layers.append(LayerKernel(name=name, kernel=kernel,
                                  n_params=sum(int(leaves.values[i].size) for i in index)))
    return LayerKernels(layers=tuple(layers), n_samples=n, n_outputs=n_outputs,
                        device=device_name(device))
