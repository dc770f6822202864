"""The TensorFlow / Keras backend and its checkpoint loaders (``.keras``, SavedModel, ``.h5``).

This package's ``__init__`` holds the plugin's hooks (the ``tensorflow`` entry point; the
backend's registry name is ``tensorflow``, as in ``--backend tensorflow``); importing it
imports neither TensorFlow, Keras, JAX nor torch. One job per module, the ground floor
first:

* ``setup``: model kinds, inputs, outputs, devices, the float64 scope, a Keras model
  re-created in another dtype, and ``prepare``, which gives a request's ``Setup``;
* ``jacobian``: per-sample Jacobians (GradientTape, ``torch.func``) and the kernel;
* ``module``: ``tf.Module`` and SavedModel engines;
* ``bridge``: Keras on JAX and on torch through the JAX and torch backends' engines;
* ``diagonal``: ``K_ii`` without the kernel; ``layers``: each layer's kernel;
* ``quiet``: TensorFlow's log noise silenced during a measurement;
* ``backend``: :class:`KerasBackend`, which dispatches;
* ``loaders``: ``.keras``, SavedModel and ``.h5`` checkpoint loaders.

``setup`` and ``jacobian`` never import ``backend``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cvcore.hookspecs import hookimpl


@hookimpl
def cvcore_register_backends(register: Callable[[Any], None]) -> None:
    from cvcore.backends.keras.backend import KerasBackend

    register(KerasBackend())


@hookimpl
def cvcore_register_loaders(register: Callable[[Any], None]) -> None:
    from cvcore.backends.keras import loaders

    for loader in loaders.LOADERS:
        register(loader)
