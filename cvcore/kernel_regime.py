"""A model's kernel-regime predictions, and how far its real training left them.

:func:`kernel_predictions` measures what :func:`cvcore.predict.gradient_descent_mse`
needs from a model at initialisation (the NTK on the training inputs, the cross kernel
test × train, the outputs ``f_0``) and returns the linearised model's outputs at the
times asked (``t=None``: ``t = ∞``). :func:`kernel_regime_distance` compares a trained
copy of the model with that prediction at the same time
(:func:`cvcore.predict.regime_distance`). Conventions: :mod:`cvcore.predict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cvcore.api import ntk
from cvcore.errors import InputError
from cvcore.nngp import outputs_of
from cvcore.predict import RegimeDistance, gradient_descent_mse, regime_distance
from cvcore.protocols import OutputSelector


@dataclass(frozen=True)
class KernelPrediction:
    """The linearised model's outputs under gradient flow on MSE.

    Attributes:
        t: the times (``inf`` for ``t=None``), the leading axis of ``train`` / ``test``
            when ``t`` was an array.
        train: outputs on the training inputs ``(…, N, O)``.
        test: outputs on the test inputs ``(…, M, O)``, or ``None``.
        initial_train, initial_test: ``f_0`` on the two sets.
        convention: the loss, time and kernel conventions in words.
    """

    t: NDArray[np.float64]
    train: NDArray[np.float64]
    test: NDArray[np.float64] | None
    initial_train: NDArray[np.float64]
    initial_test: NDArray[np.float64] | None
    convention: str


def kernel_predictions(model: Any, x_train: Any, y_train: ArrayLike,
                       t: float | Sequence[float] | None = None, x_test: Any = None, *,
                       learning_rate: float = 1.0, diag_reg: float = 0.0,
                       diag_reg_absolute_scale: bool = False, loss: str = "mean",
                       kernel: str = "full", output: OutputSelector | None = None,
                       backend: str | None = None, dtype: str | None = "float64",
                       device: str | None = None, family: str | None = None
                       ) -> KernelPrediction:
    """The linearised ``model``'s outputs after gradient flow for time ``t`` (a number,
    an array of times, or ``None`` for ``t = ∞``) on MSE towards ``y_train``.

    ``kernel="full"`` (default) is exact for this finite network; ``"traced"`` uses
    ``Θ ⊗ I`` (neural-tangents' ``trace_axes=(-1,)``), exact only in the infinite-width
    limit or for one output. ``y_train`` is ``(N, O)`` (or ``(N,)`` for one output).
    """
    common: dict[str, Any] = {"output": output, "backend": backend, "dtype": dtype,
                              "device": device, "family": family}
    f0 = outputs_of(model, x_train, shaped=False, **common)
    y = np.asarray(y_train, dtype=np.float64)
    y = y[:, None] if y.ndim == 1 else y
    if y.shape != f0.shape:
        raise InputError(f"expected y_train of the outputs' shape {f0.shape}, got {np.shape(y_train)}")
    k_tt = ntk(model, x_train, kernel=kernel, **common)
    predictor = gradient_descent_mse(k_tt, y, learning_rate, diag_reg, diag_reg_absolute_scale,
                                     loss)
    f0_test = None
    times = np.asarray(np.inf if t is None else t, dtype=np.float64)
    if x_test is None:
        train = predictor(times, f0)
        test = None
    else:
        f0_test = outputs_of(model, x_test, shaped=False, **common)
        k_test = ntk(model, x_test, x_train, kernel=kernel, **common)
        train, test = predictor(times, f0, f0_test, k_test)
    return KernelPrediction(t=times, train=train, test=test, initial_train=f0,
                            initial_test=f0_test, convention=predictor.convention)


def kernel_regime_distance(initial: Any, trained: Any, x_train: Any, y_train: ArrayLike,
                           t: float, x: Any = None, *, learning_rate: float = 1.0,
                           diag_reg: float = 0.0, loss: str = "mean", kernel: str = "full",
                           output: OutputSelector | None = None, backend: str | None = None,
                           dtype: str | None = "float64", device: str | None = None,
                           family: str | None = None) -> RegimeDistance:
    """How far the ``trained`` model (trained from ``initial`` for time ``t = steps``
    with ``learning_rate`` on MSE, :mod:`cvcore.predict`'s conventions) is from the
    kernel prediction at the same time, on ``x`` (default: the training inputs)."""
    common: dict[str, Any] = {"output": output, "backend": backend, "dtype": dtype,
                              "device": device, "family": family}
    pred = kernel_predictions(initial, x_train, y_train, t, x, learning_rate=learning_rate,
                              diag_reg=diag_reg, loss=loss, kernel=kernel, **common)
    on = x_train if x is None else x
    predicted = pred.train if x is None else pred.test
    start = pred.initial_train if x is None else pred.initial_test
    assert predicted is not None and start is not None
    f_net = outputs_of(trained, on, shaped=False, **common)
    return regime_distance(f_net, predicted, start)


__all__ = ["KernelPrediction", "kernel_predictions", "kernel_regime_distance"]
