"""cvcore-numpy-mlp: an example third-party cvcore plugin for plain NumPy MLPs.

It registers a backend and a checkpoint loader, both named ``numpy-mlp``, through the
``cvcore`` entry point group (see ``plugin.py``).
"""

from __future__ import annotations

from cvcore_numpy_mlp.model import MARKER, NumpyMLP

__version__ = "0.1.0"
__all__ = ["MARKER", "NumpyMLP"]
