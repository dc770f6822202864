"""The relative error every numeric test compares against its tolerance.

One definition for the whole suite: a test states its tolerance, never its own way of
measuring the distance, so two tests with the same tolerance ask for the same thing.

>>> rel_error([1.0, 2.0], [1.0, 2.5])
0.2
>>> rel_error([0.0], [0.0], floor=1e-300)
0.0
>>> round(rel_error([3.0, 4.0], [0.0, 5.0], norm="l2"), 6)
0.632456
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

__all__ = ["rel_error"]


def rel_error(a: Any, b: Any, *, norm: Literal["max", "l2"] = "max",
              floor: float = 0.0) -> float:
    """How far ``a`` is from the reference ``b``, relative to the size of ``b``.

    Both are read as float64 NumPy arrays (NumPy, JAX and TensorFlow arrays, CPU torch
    tensors, lists and scalars all work), so the error itself carries no float32 rounding.

    Args:
        a: The computed value.
        b: The reference value; its size is the denominator.
        norm: ``"max"`` compares the largest entrywise difference with the reference's
            largest entry, ``max|a − b| / max|b|``; ``"l2"`` compares Euclidean
            (Frobenius) norms, ``‖a − b‖ / ‖b‖``.
        floor: The smallest denominator; ``1e-300`` makes an all-zero reference give 0
            for an all-zero ``a`` instead of NaN.

    Returns:
        The relative error as a Python float.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if norm == "l2":
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), floor))
    return float(np.abs(a - b).max() / max(np.abs(b).max(), floor))
