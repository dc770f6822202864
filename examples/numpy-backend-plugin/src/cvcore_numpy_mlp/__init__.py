"""cvcore-numpy-mlp: an example third-party cvcore plugin for plain NumPy MLPs.

Laid out like one of cvcore's own framework folders (``cvcore/backends/<framework>/``):
this ``__init__`` holds the plugin's hooks (the ``cvcore`` entry point names this
package), and each role has the module of the same name:

* ``model``: :class:`NumpyMLP` itself (the "framework" this plugin measures);
* ``setup``: the ground floor: the request's options, the inputs, the weights;
* ``jacobian``: per-sample Jacobians as kernel rows, and the kernel assembled from them;
* ``diagonal``: ``K_ii`` without the kernel (the optional ``diagonal`` capability);
* ``backend``: :class:`~cvcore_numpy_mlp.backend.NumpyMLPBackend`, which dispatches;
* ``loaders``: the ``.npz`` checkpoint loader.

Lower floors never import higher ones: ``setup`` imports only ``model``; ``jacobian`` and
``diagonal`` build on ``setup``; only ``backend`` imports them all. The hooks import what
they register inside their bodies, as a plugin for a heavy framework must (importing this
package imports NumPy and the model only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cvcore.hookspecs import hookimpl

from cvcore_numpy_mlp.model import MARKER, NumpyMLP

__version__ = "0.1.0"
__all__ = ["MARKER", "NumpyMLP", "cvcore_register_backends", "cvcore_register_loaders"]


@hookimpl
def cvcore_register_backends(register: Callable[[Any], None]) -> None:
    from cvcore_numpy_mlp.backend import NumpyMLPBackend

    register(NumpyMLPBackend())


@hookimpl
def cvcore_register_loaders(register: Callable[[Any], None]) -> None:
    from cvcore_numpy_mlp import loaders

    for loader in loaders.LOADERS:
        register(loader)
