"""The ground floor of the ``numpy-mlp`` backend: the request's options, the inputs and
the weights, checked and converted once for every engine above (``jacobian``,
``diagonal``). It imports nothing else of this package but ``model``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cvcore.errors import InputError, ModelError, describe
from cvcore.protocols import KernelRequest

from cvcore_numpy_mlp.model import Array, NumpyMLP


def check_request(request: KernelRequest) -> None:
    """Refuse options that make no sense for a NumPy MLP."""
    if request.output is not None:
        raise InputError(f"expected output=None (a numpy-mlp model has one output array), "
                         f"got {request.output!r}")
    if request.device not in (None, "cpu"):
        raise InputError(f"expected device None or 'cpu' for the numpy-mlp backend, "
                         f"got {request.device!r}")


def dtype_of(request: KernelRequest) -> Any:
    """The NumPy dtype the whole computation runs in."""
    return np.float64 if request.dtype == "float64" else np.float32


def as_inputs(inputs: Any, n_features: int, dtype: Any) -> Array:
    """Inputs as a 2-D array ``(N, n_features)`` in ``dtype`` (per-sample axes flattened)."""
    if inputs is None or isinstance(inputs, (str, bytes, dict)):
        raise InputError(f"expected inputs as a numeric array of shape (N, {n_features}), "
                         f"got {describe(inputs)}")
    try:
        arr = np.asarray(inputs)
    except ValueError as exc:
        raise InputError(f"expected inputs as a numeric array, got {exc}") from None
    if arr.dtype.kind not in "fiu" or arr.ndim < 2:
        raise InputError(f"expected inputs as a numeric array of shape (N, {n_features}), "
                         f"got {describe(arr)}")
    if arr.shape[0] == 0:
        raise InputError("expected at least one input sample, got an empty batch")
    per_sample = int(np.prod(arr.shape[1:]))
    if per_sample != n_features:
        raise InputError(f"expected {n_features} features per sample, got per-sample shape "
                         f"{arr.shape[1:]}")
    x = arr.reshape(arr.shape[0], n_features).astype(dtype)
    if not np.isfinite(x).all():
        raise InputError("expected finite inputs, got NaN or Inf")
    return x


def prepare(model: Any, inputs: Any, request: KernelRequest) -> tuple[NumpyMLP, Array]:
    """The model (checked) and its inputs in the request's dtype, for every engine."""
    if not isinstance(model, NumpyMLP):
        raise ModelError(f"expected a cvcore_numpy_mlp.NumpyMLP, got {describe(model)}")
    check_request(request)
    if not all(np.isfinite(t).all() for t in model.tensors()):
        raise ModelError("expected finite weights, got NaN or Inf")
    return model, as_inputs(inputs, model.n_inputs, dtype_of(request))
