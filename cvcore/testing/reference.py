"""Reference implementations the conformance suite compares a backend against.

A Jacobian by central finite differences in float64 (:func:`finite_difference_jacobian`,
through a :class:`FiniteDifferenceAccess` the backend's author writes), the kernels it
gives in both conventions (:func:`kernel_from_jacobian`, :func:`traced_from_full`) and
the relative error kernels are compared by. NumPy only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import describe
from cvcore.protocols import KernelKind


@dataclass(frozen=True)
class FiniteDifferenceAccess:
    """How the suite reaches a model's trainable parameters to difference its outputs.

    Attributes:
        get_params: ``get_params(model)`` returns every trainable parameter of the model
            as one flat vector, in any fixed order (its length must equal the backend's
            ``n_params``).
        forward: ``forward(model, params, inputs)`` evaluates the model in float64 with
            its trainable parameters replaced by the flat vector ``params`` and returns
            the outputs as an array of shape ``(N, ...)`` (flattened per sample to
            ``(N, O)`` in the backend's output order). It must not modify ``model``.
        step: relative step of the central differences: parameter ``θ_p`` moves by
            ``± step · max(1, |θ_p|)``.
    """

    get_params: Callable[[Any], Any]
    forward: Callable[[Any, NDArray[np.float64], Any], Any]
    step: float = 1e-5

    @classmethod
    def from_setter(cls, get_params: Callable[[Any], Any],
                    set_params: Callable[[Any, NDArray[np.float64]], None],
                    apply: Callable[[Any, Any], Any], step: float = 1e-5
                    ) -> FiniteDifferenceAccess:
        """An access for models whose parameters are set in place.

        Args:
            get_params: as for the class.
            set_params: ``set_params(model, params)`` writes a flat float64 vector into
                the model (the model must then compute in float64).
            apply: ``apply(model, inputs)`` returns the model's outputs, ``(N, ...)``.
            step: as for the class.

        Returns:
            An access whose ``forward`` sets the parameters, applies the model and puts
            the original parameters back.
        """

        def forward(model: Any, params: NDArray[np.float64], inputs: Any) -> Any:
            saved = np.array(get_params(model), dtype=np.float64, copy=True)
            set_params(model, params)
            try:
                return apply(model, inputs)
            finally:
                set_params(model, saved)

        return cls(get_params=get_params, forward=forward, step=step)


def relative_error(actual: Any, expected: Any) -> float:
    """``max |actual - expected| / max |expected|`` (the absolute error if ``expected`` is 0).

    >>> relative_error([1.0, 2.0], [1.0, 2.5])
    0.2
    """
    a = np.asarray(actual, dtype=np.float64)
    b = np.asarray(expected, dtype=np.float64)
    if a.size == 0 and b.size == 0:
        return 0.0
    diff = float(np.abs(a - b).max())
    scale = float(np.abs(b).max())
    return diff / scale if scale > 0 else diff


def finite_difference_jacobian(access: FiniteDifferenceAccess, model: Any, inputs: Any
                               ) -> NDArray[np.float64]:
    """The per-sample Jacobian ``J[i, o, p] = ∂f_o(x_i)/∂θ_p`` by central differences.

    Args:
        access: how to read the parameters and run the forward pass.
        model: the model.
        inputs: the probe inputs, batch first, as the model takes them.

    Returns:
        ``J`` in float64, shape ``(N, O, P)``.

    Raises:
        AssertionError: ``get_params`` or ``forward`` return something unusable.

    >>> access = FiniteDifferenceAccess(get_params=lambda m: m,
    ...                                 forward=lambda m, p, x: p[0] * x + p[1])
    >>> jac = finite_difference_jacobian(access, np.array([2.0, 0.5]), np.array([[1.0], [3.0]]))
    >>> jac.shape, np.round(jac[:, 0, :], 6).tolist()
    ((2, 1, 2), [[1.0, 1.0], [3.0, 1.0]])
    """
    theta = np.array(access.get_params(model), dtype=np.float64, copy=True).ravel()
    if theta.size == 0:
        raise AssertionError("expected get_params(model) to return at least one parameter, got none")
    base = _outputs(access, model, theta, inputs)
    jac = np.empty((base.shape[0], base.shape[1], theta.size), dtype=np.float64)
    for p in range(theta.size):
        h = access.step * max(1.0, abs(float(theta[p])))
        plus, minus = theta.copy(), theta.copy()
        plus[p] += h
        minus[p] -= h
        f_plus = _outputs(access, model, plus, inputs)
        f_minus = _outputs(access, model, minus, inputs)
        jac[:, :, p] = (f_plus - f_minus) / (plus[p] - minus[p])
    return jac


def _outputs(access: FiniteDifferenceAccess, model: Any, params: NDArray[np.float64],
             inputs: Any) -> NDArray[np.float64]:
    out = np.asarray(access.forward(model, params, inputs), dtype=np.float64)
    if out.ndim == 0:
        raise AssertionError(f"expected forward() to return outputs with a batch axis, got {describe(out)}")
    return out.reshape(out.shape[0], -1)


def kernel_from_jacobian(jac: NDArray[np.float64], kernel: KernelKind) -> NDArray[np.float64]:
    """The NTK of a per-sample Jacobian ``(N, O, P)`` in either convention.

    >>> jac = np.array([[[1.0, 0.0], [0.0, 2.0]]])  # one sample, two outputs
    >>> kernel_from_jacobian(jac, "traced").tolist(), kernel_from_jacobian(jac, "full").tolist()
    ([[2.5]], [[1.0, 0.0], [0.0, 4.0]])
    """
    n, o, p = jac.shape
    if kernel == "traced":
        rows = jac.reshape(n, o * p)
        out: NDArray[np.float64] = rows @ rows.T / o
        return out
    rows = jac.reshape(n * o, p)
    full: NDArray[np.float64] = rows @ rows.T
    return full


def traced_from_full(full: NDArray[Any], n_samples: int) -> NDArray[np.float64]:
    """The traced kernel as the mean of a full kernel's output-diagonal blocks.

    >>> traced_from_full(np.array([[1.0, 9.0], [9.0, 3.0]]), 1).tolist()
    [[2.0]]
    """
    dim = full.shape[0]
    o = dim // n_samples
    blocks = np.asarray(full, dtype=np.float64).reshape(n_samples, o, n_samples, o)
    out: NDArray[np.float64] = np.einsum("iojo->ij", blocks) / o
    return out

