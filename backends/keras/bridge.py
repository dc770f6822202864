"""The bridge from a Keras model to the JAX and torch backends' engines.

Keras on JAX goes to the JAX backend (its structured engine and its Jacobian path) as
``(apply_fn, theta)`` (:func:`jax_pair`); Keras on torch goes to the torch backend as a
``torch.nn.Module`` of its weights (:func:`torch_module`).

A Keras model on the JAX Keras backend is a JAX function of its weights:
``stateless_call(theta, fixed, x)`` traces to a jaxpr like any ``apply_fn``. It is handed
to :class:`cvcore.backends.jax.backend.JaxBackend` as the pair ``(apply_fn, theta)``, so
the layer rules of :mod:`cvcore.backends.jax.structured` (dense layers and convolutions,
read off the jaxpr), the JAX Jacobian path, ``implementation=``, the memory blocking and
the diagonal are the JAX backend's own; nothing here computes a derivative. The weights
come from :func:`cvcore.backends.keras.setup.prepare` (recast copy in the request's
dtype when needed, non-trainable weights held fixed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cvcore.protocols import KernelRequest

from .setup import keras_device, prepare


def jax_pair(model: Any, x: Any, request: KernelRequest) -> tuple[Any, list[Any]]:
    """``(apply_fn, theta)`` for the JAX backend: ``apply_fn(theta, x)`` is the model's raw
    output (the JAX backend selects ``request.output``)."""
    s = prepare(model, x, request, "jax")

    def apply_fn(theta: list[Any], *args: Any, **kwargs: Any) -> Any:
        # the JAX backend calls apply_fn(theta, x), (theta, *x) or (theta, **x)
        batch = dict(kwargs) if kwargs else args[0] if len(args) == 1 else tuple(args)
        return s.call(theta, batch)

    return apply_fn, s.theta



def torch_request(request: KernelRequest) -> KernelRequest:
    """The request as the torch backend reads it for a Keras-on-torch model: the device
    Keras runs on, in torch's words (``cpu`` or ``cuda:<index>``)."""
    kind, _, index = keras_device(request.device, "torch").partition(":")
    return dataclasses.replace(request, device="cpu" if kind == "cpu" else f"cuda:{index}")


def torch_module(model: Any, x: Any, request: KernelRequest) -> Any:
    """A Keras-on-torch model as a plain ``torch.nn.Module`` of its weights, for the torch
    backend (:class:`cvcore.backends.torch.backend.TorchBackend`).

    Its parameters are copies of the trainable weights (cast to the request's dtype) and
    its buffers the non-trainable ones, named by the Keras variables' paths; its forward
    is ``stateless_call`` with them. ``torch.func.functional_call`` on it therefore
    differentiates the Keras model (on the Keras model itself it would see none of the
    weights Keras reads), and the torch backend's capture, rules, row checks, Jacobian
    path and diagonal serve it unchanged.
    """
    import torch

    s = prepare(model, x, request, "torch")
    names = _torch_names(s.paths)
    fixed = [f"fixed/{i}" for i in range(len(s.fixed))]

    class KerasFunction(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, t in zip(names, s.theta):
                self.register_parameter(name, torch.nn.Parameter(t.detach().clone()))
            for name, t in zip(fixed, s.fixed):
                self.register_buffer(name, t.detach().clone())

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            batch = dict(kwargs) if kwargs else args[0] if len(args) == 1 else tuple(args)
            return s.call([getattr(self, k) for k in names], batch,
                          [getattr(self, k) for k in fixed])

    return KerasFunction()


def _torch_names(paths: list[str]) -> list[str]:
    """The variables' paths as names ``register_parameter`` takes (no ``.``), made unique
    by their index where two coincide."""
    names = [p.replace(".", "_") or "weight" for p in paths]
    return [f"{name}#{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]
