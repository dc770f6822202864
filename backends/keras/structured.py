"""Keras on JAX through the JAX backend: its structured (per-layer) engine and its
Jacobian path.

A Keras model on the JAX Keras backend is a JAX function of its weights:
``stateless_call(theta, fixed, x)`` traces to a jaxpr like any ``apply_fn``. It is handed
to :class:`cvcore.backends.jax.backend.JaxBackend` as the pair ``(apply_fn, theta)``, so
the layer rules of :mod:`cvcore.backends.jax.structured` (dense layers and convolutions,
read off the jaxpr), the JAX Jacobian path, ``implementation=``, the memory blocking and
the diagonal are the JAX backend's own; nothing here computes a derivative. The weights
come from :func:`cvcore.backends.keras.jacobian.stateless` (recast copy in the request's
dtype when needed, non-trainable weights held fixed).
"""

from __future__ import annotations

from typing import Any

from cvcore.backends.keras.jacobian import stateless

from cvcore.protocols import KernelRequest


def jax_pair(model: Any, x: Any, request: KernelRequest) -> tuple[Any, list[Any]]:
    """``(apply_fn, theta)`` for the JAX backend: ``apply_fn(theta, x)`` is the model's raw
    output (the JAX backend selects ``request.output``)."""
    s = stateless(model, x, request, "jax")

    def apply_fn(theta: list[Any], *args: Any, **kwargs: Any) -> Any:
        # the JAX backend calls apply_fn(theta, x), (theta, *x) or (theta, **x)
        batch = dict(kwargs) if kwargs else args[0] if len(args) == 1 else tuple(args)
        return s.call(theta, batch)

    return apply_fn, s.theta

