"""What every stochastic estimator shares: probes, checked products, probe statistics.

NumPy only; nothing here imports a framework or :mod:`cvcore.api`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import InputError, KernelError
from cvcore.protocols import MatVec

#: Anything :func:`numpy.random.default_rng` accepts: a seed, a ``Generator`` or ``None``.
Seed = Any

DEFAULT_PROBES = 32


class Estimate(NamedTuple):
    """A stochastic estimate and its standard error."""

    value: float
    stderr: float


def check_counts(dim: int, **counts: int) -> None:
    """Refuse a dimension below 1, ``probes`` below 2 and other counts below 1."""
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InputError(f"expected a positive operator dimension, got {dim!r}")
    for name, value in counts.items():
        low = 2 if name == "probes" else 1
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise InputError(f"expected {name} to be an integer of at least {low}, got {value!r}")


def apply(matvec: MatVec, block: NDArray[np.float64]) -> NDArray[np.float64]:
    """``matvec(block)`` in float64, checked for shape and finiteness."""
    out = np.asarray(matvec(block), dtype=np.float64)
    if out.shape != block.shape:
        raise KernelError(f"expected the operator to return shape {block.shape}, got {out.shape}")
    if not np.isfinite(out).all():
        raise KernelError(f"expected finite operator values, got {int((~np.isfinite(out)).sum())} NaN/Inf")
    return out


def rademacher(rng: np.random.Generator, dim: int, probes: int) -> NDArray[np.float64]:
    """``probes`` columns of independent ±1 entries."""
    return rng.integers(0, 2, size=(dim, probes)).astype(np.float64) * 2.0 - 1.0


def standard_error(samples: NDArray[np.float64]) -> float:
    """The standard error of the samples' mean."""
    return float(np.std(samples, ddof=1) / math.sqrt(samples.size))


def t_factor(dof: int) -> float:
    """``t_{0.975}(dof) / 2``: what makes ``±2·stderr`` a 95 % interval for a mean of
    ``dof + 1`` samples (Student's t; the Cornish-Fisher expansion, within 1 % of the
    exact quantile from ``dof = 3`` on, and ``1`` in the limit of many samples).

    >>> round(t_factor(7) * 2, 3), round(t_factor(31) * 2, 3), round(t_factor(10**6) * 2, 3)
    (2.364, 2.04, 1.96)
    """
    z, n = 1.959963984540054, float(max(dof, 1))
    t = (z + (z**3 + z) / (4 * n) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * n**2)
         + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * n**3))
    return t / 2.0


def coldot(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    """The dot product of each column of ``a`` with the same column of ``b``."""
    out: NDArray[np.float64] = np.einsum("ij,ij->j", a, b)
    return out


def control_variate(y: NDArray[np.float64], a: NDArray[np.float64], mean_a: float) -> Estimate:
    """Mean of ``y`` with ``a`` (whose mean ``mean_a`` is known) as a control variate.

    The per-probe entropy terms are strongly correlated with the per-probe trace
    ``zᵀKz / Tr K``; regressing that out cuts the standard error (about halved on
    power-law spectra) at the cost of an ``O(1/probes)`` bias. The standard error is the
    jackknife's (the coefficient re-fitted without each probe), so it includes the noise of
    the fitted coefficient, which the textbook formula leaves out.
    """
    m = y.size

    def fit(ys: NDArray[np.float64], as_: NDArray[np.float64]) -> float:
        var_a = float(np.var(as_, ddof=1))
        c = float(np.cov(ys, as_, ddof=1)[0, 1]) / var_a if var_a > 0.0 and ys.size > 2 else 0.0
        return float(ys.mean() - c * (as_.mean() - mean_a))

    full = fit(y, a)
    if m < 4:
        return Estimate(full + 0.0, standard_error(y))
    keep = ~np.eye(m, dtype=bool)
    loo = np.array([fit(y[keep[i]], a[keep[i]]) for i in range(m)])
    stderr = math.sqrt((m - 1) / m * float(((loo - loo.mean()) ** 2).sum()))
    # The fitted coefficient correlates with the probes' mean: an O(1/m) bias, which
    # the jackknife removes to first order.
    corrected = m * full - (m - 1) * float(loo.mean())
    return Estimate(corrected + 0.0, stderr)


def ratio_jackknife(a: NDArray[np.float64], b: NDArray[np.float64]) -> Estimate:
    """``S = ln Ā - B̄/Ā`` (``a`` samples the trace, ``b`` samples ``Σ λ ln λ``, both in one
    unit) and its jackknife standard error."""
    m = a.size

    def entropy(mean_a: Any, mean_b: Any) -> Any:
        return np.log(mean_a) - mean_b / mean_a

    full = float(entropy(a.mean(), b.mean()))
    loo = entropy((a.sum() - a) / (m - 1), (b.sum() - b) / (m - 1))
    stderr = math.sqrt((m - 1) / m * float(((loo - loo.mean()) ** 2).sum()))
    return Estimate(full + 0.0, stderr)


__all__ = ["DEFAULT_PROBES", "Estimate", "Seed", "apply", "check_counts", "coldot",
           "control_variate", "rademacher", "ratio_jackknife", "standard_error", "t_factor"]
