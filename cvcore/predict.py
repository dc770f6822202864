"""What the linearised model predicts under gradient descent on MSE: kernel predictions.

Pure NumPy (float64) on kernels computed anywhere (:func:`cvcore.ntk`, neural-tangents,
a file). The model linearised around its initial parameters, ``f_lin(x; θ) = f_0(x) +
J_0(x)(θ − θ_0)``, trained by gradient flow with learning rate ``η`` on

    L(θ) = (1 / (2·n)) · Σ_{i,c} (f(x_i)_c − y_ic)²,   n = N·C  (``loss="mean"``, default)
    L(θ) = (1 / 2) · Σ_{i,c} (f(x_i)_c − y_ic)²,        n = 1    (``loss="sum"``)

moves its outputs as ``ḟ = −(η/n) Θ (f − y)``, Θ the empirical NTK on the training
inputs. In closed form, with τ = η·t/n:

    f_t(X)  = f_0(X) − (I − e^{−Θτ}) (f_0(X) − Y)
    f_t(x*) = f_0(x*) − Θ(x*, X) Θ⁻¹ (I − e^{−Θτ}) (f_0(X) − Y)

and at ``t = ∞`` the same with ``e^{−Θτ} = 0`` on the eigen-directions with non-zero
eigenvalue (a pseudo-inverse: directions the kernel cannot move stay where they started).
These are neural-tangents' ``predict.gradient_descent_mse`` conventions: its time is
``learning_rate · t`` and its normalisation ``y_train.size`` (``loss="mean"``), its
``diag_reg`` adds ``diag_reg · Tr Θ / D`` to the diagonal (``diag_reg · I`` with
``diag_reg_absolute_scale=True``), for the training dynamics as well as the inverse.

Kernels, as :func:`cvcore.ntk` gives them (neural-tangents' 4-axis full kernels are
accepted too): a traced ``N × N`` kernel acts on every output column alike (``Θ ⊗ I``,
neural-tangents' ``trace_axes=(-1,)``); a full ``(N·C) × (N·C)`` kernel (row ``i·C + c``)
couples the outputs (``trace_axes=()``, exact for a finite network). The test kernel is
``Θ(x*, X)``: ``M × N`` or ``(M·C) × (N·C)`` (``cvcore.ntk(model, x_test, x_train)``).

:func:`regime_distance` says how far real training left this regime: the distance between
the trained network's outputs and the kernel prediction at the same time, relative to how
far the prediction moved from ``f_0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cvcore.errors import InputError, KernelError

LOSSES = ("mean", "sum")
F64 = NDArray[np.float64]


#: The most negative eigenvalue, relative to the largest in size, a training kernel may
#: have: far beyond the round-off of a float32 kernel (about 1e-7 · N), far from any
#: kernel with a real negative direction.
NEGATIVE = 1e-3


def _two_d(k: ArrayLike, name: str) -> F64:
    """A kernel as a float64 matrix; neural-tangents' ``(N₁, N₂, C₁, C₂)`` made
    ``(N₁·C₁) × (N₂·C₂)`` (row ``i·C + c``)."""
    a = np.asarray(k, dtype=np.float64)
    if a.ndim == 4:
        a = a.transpose(0, 2, 1, 3).reshape(a.shape[0] * a.shape[2], a.shape[1] * a.shape[3])
    if a.ndim != 2:
        raise InputError(f"expected {name} as a 2-D kernel (or neural-tangents' 4-axis full "
                         f"kernel), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise KernelError(f"expected a finite {name}, got NaN or Inf")
    return a


def _targets(y: ArrayLike) -> F64:
    a = np.asarray(y, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise InputError(f"expected targets of shape (N,) or (N, C), got {np.shape(y)}")
    return a


def _like(value: ArrayLike | None, shape: tuple[int, ...], name: str) -> F64 | None:
    if value is None:
        return None
    a = np.asarray(value, dtype=np.float64)
    if a.ndim == 1 and len(shape) == 2 and shape[1] == 1 and a.shape[0] == shape[0]:
        a = a[:, None]
    try:
        return np.broadcast_to(a, shape).copy()
    except ValueError:
        raise InputError(f"expected {name} of shape {shape}, got {a.shape}") from None


@dataclass(frozen=True)
class MsePredictor:
    """The kernel regime's outputs at any time (``gradient_descent_mse``'s result).

    Call it as neural-tangents' ``predict_fn``: ``predictor(t, fx_train_0, fx_test_0,
    k_test_train)``; ``t=None`` is ``t = ∞``; ``t`` may be an array (its shape leads the
    result's). Returns the training outputs, or ``(train, test)`` when ``fx_test_0`` is
    given (``fx_train_0=None``: the test outputs alone).
    """

    y_train: F64
    learning_rate: float
    normalization: float
    full: bool
    evals: F64
    evecs: F64
    tolerance: float

    @property
    def convention(self) -> str:
        """The conventions of the prediction, in words."""
        loss = "0.5*mean" if self.normalization != 1.0 else "0.5*sum"
        return (f"gradient flow on MSE (L = {loss} of squared errors), time = learning_rate*t "
                f"/ {self.normalization:g}; {'full' if self.full else 'traced (Theta x I)'} kernel")

    def _rotate(self, r: F64) -> F64:
        """``r`` as the kernel's columns: ``(D, k)``."""
        return r.reshape(-1, 1) if self.full else r

    def _unrotate(self, v: F64, rows: int) -> F64:
        c = self.y_train.shape[1]
        return v.reshape(rows, c) if self.full else v

    def _factors(self, t: float) -> tuple[F64, F64]:
        """``expm1(−λτ)`` and ``expm1(−λτ)/λ`` (``−τ`` where ``λ = 0``) at time ``t``."""
        lam = np.maximum(self.evals, 0.0)
        zero = lam <= self.tolerance
        if np.isinf(t):
            e = np.where(zero, 0.0, -1.0)
            return e, np.where(zero, 0.0, -1.0 / np.where(zero, 1.0, lam))
        tau = self.learning_rate * t / self.normalization
        e = np.expm1(-lam * tau)
        return e, np.where(zero, -tau, e / np.where(zero, 1.0, lam))

    def __call__(self, t: float | Sequence[float] | NDArray[Any] | None = None,
                 fx_train_0: ArrayLike | None = 0.0, fx_test_0: ArrayLike | None = None,
                 k_test_train: ArrayLike | None = None) -> Any:
        y = self.y_train
        n = y.shape[0]
        times = np.asarray(np.inf if t is None else t, dtype=np.float64)
        if np.any(times < 0) or np.any(np.isnan(times)):
            raise InputError(f"expected times t >= 0, got {t!r}")
        f_train = _like(fx_train_0, y.shape, "fx_train_0")
        k_test = None
        f_test = None
        if fx_test_0 is not None:
            if k_test_train is None:
                raise InputError("expected k_test_train with fx_test_0, got none")
            k_test = _two_d(k_test_train, "k_test_train")
            width = k_test.shape[1]
            if width != self.evecs.shape[0]:
                raise InputError(f"expected k_test_train with {self.evecs.shape[0]} columns (the "
                                 f"training kernel's), got {width}")
            m = k_test.shape[0] // (y.shape[1] if self.full else 1)
            f_test = _like(fx_test_0, (m, y.shape[1]), "fx_test_0")
        r = self._rotate((np.zeros_like(y) if f_train is None else f_train) - y)
        rot = self.evecs.T @ r
        trains, tests = [], []
        for tt in times.reshape(-1):
            e, phi = self._factors(float(tt))
            if f_train is not None:
                trains.append(f_train + self._unrotate(self.evecs @ (e[:, None] * rot), n))
            if k_test is not None and f_test is not None:
                moved = k_test @ (self.evecs @ (phi[:, None] * rot))
                tests.append(f_test + self._unrotate(moved, f_test.shape[0]))

        def stack(parts: list[F64]) -> F64:
            return np.stack(parts).reshape(times.shape + parts[0].shape)

        if f_train is not None and tests:
            return stack(trains), stack(tests)
        return stack(tests) if tests else stack(trains)


def gradient_descent_mse(k_train_train: ArrayLike, y_train: ArrayLike, learning_rate: float = 1.0,
                         diag_reg: float = 0.0, diag_reg_absolute_scale: bool = False,
                         loss: str = "mean") -> MsePredictor:
    """neural-tangents' ``predict.gradient_descent_mse`` (see the module docstring for
    the conventions): a :class:`MsePredictor` for the training kernel and targets.

    Args:
        k_train_train: the NTK on the training inputs, traced ``N × N`` or full
            ``(N·C) × (N·C)``.
        y_train: targets ``(N, C)`` (or ``(N,)``: one column).
        learning_rate: ``η``; only ``η·t`` matters.
        diag_reg: diagonal regularisation, relative to ``Tr Θ / D`` unless
            ``diag_reg_absolute_scale``.
        loss: ``"mean"`` (neural-tangents: ``L = ½·mean``, time over ``N·C``) or ``"sum"``.

    Raises:
        InputError: shapes that do not match, an unknown loss, a negative regulariser.
        KernelError: a non-symmetric, non-finite or not positive semi-definite kernel
            (an eigenvalue below round-off of zero: gradient descent would diverge).
    """
    if loss not in LOSSES:
        raise InputError(f"expected loss 'mean' or 'sum', got {loss!r}")
    if diag_reg < 0:
        raise InputError(f"expected diag_reg >= 0, got {diag_reg}")
    if not learning_rate > 0:
        raise InputError(f"expected learning_rate > 0, got {learning_rate}")
    k = _two_d(k_train_train, "k_train_train")
    y = _targets(y_train)
    n, c = y.shape
    if k.shape[0] != k.shape[1]:
        raise KernelError(f"expected a square training kernel, got shape {k.shape}")
    if k.shape[0] == n:
        full = False
    elif k.shape[0] == n * c:
        full = True
    else:
        raise InputError(f"expected a training kernel of {n} (traced) or {n * c} (full) rows for "
                         f"targets of shape {y.shape}, got {k.shape[0]}")
    scale = np.max(np.abs(k)) if k.size else 0.0
    if not np.allclose(k, k.T, rtol=1e-6, atol=1e-10 * max(scale, 1.0)):
        raise KernelError("expected a symmetric training kernel, got an asymmetric one")
    k = (k + k.T) / 2
    dim = k.shape[0]
    reg = diag_reg if diag_reg_absolute_scale else diag_reg * float(np.trace(k)) / dim
    evals, evecs = np.linalg.eigh(k + reg * np.eye(dim))
    tol = float(np.max(np.abs(evals), initial=0.0)) * dim * np.finfo(np.float64).eps
    if evals.size and evals[0] < -max(64 * tol, NEGATIVE * float(np.max(np.abs(evals)))):
        # gradient descent on a kernel with a negative direction diverges: no prediction
        raise KernelError(f"expected a positive semi-definite training kernel, got an "
                          f"eigenvalue {evals[0]:.3g} (largest {evals[-1]:.3g})")
    return MsePredictor(y_train=y, learning_rate=float(learning_rate),
                        normalization=float(n * c) if loss == "mean" else 1.0, full=full,
                        evals=evals, evecs=evecs, tolerance=tol)


@dataclass(frozen=True)
class RegimeDistance:
    """How far real training left the kernel regime, at one time.

    Attributes:
        rms: ``√mean (f_net − f_lin)²``, in output units.
        relative: ``‖f_net − f_lin‖ / ‖f_lin − f_0‖``: 0 in the kernel regime; near 1 or
            above when the network moved its outputs as far from the prediction as the
            prediction moved from the start (NaN when the prediction did not move).
        moved: ``‖f_net − f_0‖ / ‖f_lin − f_0‖``: how far the network moved its outputs,
            relative to the kernel prediction (NaN likewise).
    """

    rms: float
    relative: float
    moved: float


def regime_distance(f_trained: ArrayLike, f_predicted: ArrayLike, f_initial: ArrayLike
                    ) -> RegimeDistance:
    """The distance between the trained network's outputs and the kernel prediction at
    the same time (:class:`RegimeDistance`); all three of one shape.

    Raises:
        InputError: shapes that differ or non-finite values.
    """
    a, b, c = (np.asarray(v, dtype=np.float64) for v in (f_trained, f_predicted, f_initial))
    if not a.shape == b.shape == c.shape:
        raise InputError(f"expected trained, predicted and initial outputs of one shape, got "
                         f"{a.shape}, {b.shape} and {c.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all() and np.isfinite(c).all()):
        raise InputError("expected finite outputs, got NaN or Inf")
    moved = float(np.linalg.norm(b - c))
    gap = float(np.linalg.norm(a - b))
    return RegimeDistance(rms=float(np.sqrt(np.mean((a - b) ** 2))) if a.size else 0.0,
                          relative=gap / moved if moved > 0 else float("nan"),
                          moved=float(np.linalg.norm(a - c)) / moved if moved > 0 else float("nan"))


__all__ = ["LOSSES", "MsePredictor", "RegimeDistance", "gradient_descent_mse", "regime_distance"]
