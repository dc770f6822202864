"""Stochastic Lanczos quadrature of the von Neumann entropy, optionally deflated."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import InputError, KernelError
from cvcore.estimators.common import (
    DEFAULT_PROBES,
    Seed,
    apply,
    check_counts,
    coldot,
    control_variate,
    rademacher,
    ratio_jackknife,
    standard_error,
    t_factor,
)
from cvcore.estimators.topk import TopK
from cvcore.protocols import MatVec

DEFAULT_STEPS = 40
#: Bytes the stored Lanczos basis may take for full reorthogonalization (``"auto"``).
REORTH_BYTES = 256 << 20
#: A Lanczos run stops when ``β_j`` falls below this fraction of the operator's scale.
BREAKDOWN_TOL = 1e-10


@dataclass(frozen=True)
class SLQEstimate:
    """What :func:`slq_entropy` returns.

    Attributes:
        entropy: the estimate of ``S = -Σ p ln p``.
        stderr: its standard error over probes (jackknife when the trace is estimated).
        trace: the trace used (given, or the Hutchinson estimate from the same probes).
        trace_stderr: its standard error (0 when the trace was given).
        probes: number of probe vectors.
        steps: the largest number of Lanczos steps a probe took.
    """

    entropy: float
    stderr: float
    trace: float
    trace_stderr: float
    probes: int
    steps: int


def _lanczos(matvec: MatVec, start: NDArray[np.float64], steps: int, reorthogonalize: bool
             ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
    """Independent Lanczos runs, one per column of ``start``, batched through ``matvec``.

    Returns the tridiagonals' diagonals ``α`` and off-diagonals ``β`` (``(steps, m)``)
    and each run's length (a run stops early when its Krylov space is exhausted).
    """
    dim, m = start.shape
    q = start / np.linalg.norm(start, axis=0)
    q_prev = np.zeros_like(q)
    basis = np.empty((steps, dim, m)) if reorthogonalize else None
    alpha = np.zeros((steps, m))
    beta = np.zeros((steps, m))
    lengths = np.zeros(m, dtype=np.int64)
    active = np.ones(m, dtype=bool)
    b_prev = np.zeros(m)
    scale = 0.0
    for j in range(steps):
        if basis is not None:
            basis[j] = q
        w = apply(matvec, q)
        a = coldot(q, w)
        alpha[j] = np.where(active, a, 0.0)
        lengths[active] += 1
        if j == steps - 1:
            break
        w -= a * q + b_prev * q_prev
        if basis is not None:
            for _ in range(2):  # classical Gram-Schmidt twice keeps the basis orthogonal
                coef = np.einsum("sdm,dm->sm", basis[: j + 1], w)
                w -= np.einsum("sdm,sm->dm", basis[: j + 1], coef)
        b = np.linalg.norm(w, axis=0)
        scale = max(scale, float(np.abs(a).max()), float(b.max()))
        active &= b > BREAKDOWN_TOL * scale
        if not active.any():
            break
        b = np.where(active, b, 0.0)
        beta[j] = b
        q_prev, q = q, np.where(active, w / np.where(active, b, 1.0), 0.0)
        b_prev = b
    return alpha, beta, lengths


def _gauss_rule(alpha: NDArray[np.float64], beta: NDArray[np.float64], n: int
                ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Nodes (Ritz values, round-off negatives set to 0) and weights of one run's rule."""
    t = np.diag(alpha[:n]) + np.diag(beta[: n - 1], 1) + np.diag(beta[: n - 1], -1)
    nodes, vectors = np.linalg.eigh(t)
    return np.clip(nodes, 0.0, None), vectors[0] ** 2


def _xlogx(x: NDArray[np.float64]) -> NDArray[np.float64]:
    out = np.zeros_like(x)
    pos = x > 0
    out[pos] = x[pos] * np.log(x[pos])
    return out


def slq_entropy(matvec: MatVec, dim: int, probes: int = DEFAULT_PROBES,
                steps: int = DEFAULT_STEPS, rng: Seed = None, trace: float | None = None,
                reorthogonalize: bool | None = None, deflation: TopK | None = None
                ) -> SLQEstimate:
    """Stochastic Lanczos quadrature of the von Neumann entropy ``Tr f(K)``.

    ``f(λ) = -(λ/T) ln(λ/T)``, ``0`` for ``λ ≤ 0`` (Ritz values of a PSD operator can come
    out slightly negative from round-off). Each Rademacher probe ``z`` gives
    ``zᵀ f(K) z ≈ ‖z‖² Σ_j τ_j² f(θ_j)`` from ``steps`` Lanczos steps (nodes ``θ_j``,
    weights ``τ_j²``); the same probes give Hutchinson's ``zᵀ K z = ‖z‖² α_1`` for the
    trace when ``trace`` is not given (``S = ln T - (Σ λ ln λ)/T`` from the probes' means;
    jackknife standard error, which includes the trace's uncertainty). With the exact
    trace, ``zᵀKz / Tr K`` serves as a control variate.

    With ``deflation`` (Ritz pairs from :func:`randomized_topk`), the top eigenvalues are
    counted exactly and the probes see only ``P K P``, ``P = I - U Uᵀ``: NTK spectra are
    dominated by a few large eigenvalues, which make plain probes very noisy (the
    Hutch++ idea). ``Tr K = Σ θ_top + Tr(PKP)`` holds exactly; the entropy neglects the
    coupling ``Uᵀ K P``, an error of second order in the Ritz residuals.

    Args:
        matvec: ``K @ V`` for ``V`` of shape ``(dim, probes)``.
        dim: ``D``.
        probes: number of probe vectors (at least 2).
        steps: Lanczos steps per probe (capped at ``dim``).
        rng: seed or ``numpy.random.Generator``.
        trace: the exact ``Tr K`` if known (from the kernel's diagonal), else ``None``.
        reorthogonalize: full reorthogonalization against the stored basis; ``None`` does
            it when the basis (``steps·D·probes`` floats) fits in ``REORTH_BYTES``.
        deflation: top Ritz pairs (with ``vectors``) to count exactly, or ``None``.

    Raises:
        KernelError: the trace is not positive.

    >>> est = slq_entropy(lambda v: v, 8, probes=4, steps=3, rng=0)
    >>> f"{est.entropy:.9f}", est.stderr, round(est.trace, 9)
    ('2.079441542', 0.0, 8.0)
    """
    check_counts(dim, probes=probes, steps=steps)
    steps = min(steps, dim)
    if reorthogonalize is None:
        reorthogonalize = steps * dim * probes * 8 <= REORTH_BYTES
    z = rademacher(np.random.default_rng(rng), dim, probes)
    top, op = np.zeros(0), matvec
    if deflation is not None and deflation.eigenvalues.size:
        top, op, z = _deflate(matvec, deflation, z)
    norms2 = coldot(z, z)
    alpha, beta, lengths = _lanczos(op, z, steps, reorthogonalize)
    rest = norms2 * alpha[0]  # Hutchinson samples of Tr(PKP) (of Tr K without deflation)
    scale = float(trace) if trace is not None else float(top.sum() + rest.mean())
    if not scale > 0.0:
        raise KernelError(f"expected a kernel with a positive trace, got {scale:.3g}; "
                          "the entropy is undefined")
    # In units of `scale`: a_i samples Tr(PKP), b_i samples Σ λ ln λ over PKP.
    a = rest / scale
    b = np.empty(probes)
    for i in range(probes):
        nodes, weights = _gauss_rule(alpha[:, i], beta[:, i], int(lengths[i]))
        b[i] = norms2[i] * float(weights @ _xlogx(nodes / scale))
    t_top, l_top = float(top.sum()) / scale, float(_xlogx(top / scale).sum())
    used = int(lengths.max())
    widen = t_factor(probes - 1)  # ±2·stderr is a 95 % interval for `probes` samples
    if trace is not None:  # scale = T: S = -(l_top + E[b]); E[a] = 1 - t_top is known
        entropy, stderr = control_variate(-(l_top + b), a, 1.0 - t_top)
        return SLQEstimate(entropy=entropy, stderr=stderr * widen, trace=scale,
                           trace_stderr=0.0, probes=probes, steps=used)
    entropy, stderr = ratio_jackknife(t_top + a, l_top + b)
    return SLQEstimate(entropy=entropy, stderr=stderr * widen, trace=scale,
                       trace_stderr=standard_error(rest), probes=probes, steps=used)


def _deflate(matvec: MatVec, deflation: TopK, z: NDArray[np.float64]
             ) -> tuple[NDArray[np.float64], MatVec, NDArray[np.float64]]:
    """Top eigenvalues, the operator ``P K P`` and the probes ``P z`` for ``P = I - U Uᵀ``."""
    if deflation.vectors is None:
        raise InputError("expected deflation Ritz pairs with vectors, got vectors=None")
    u = np.asarray(deflation.vectors, dtype=np.float64)
    if u.ndim != 2 or u.shape[0] != z.shape[0]:
        raise InputError(f"expected deflation vectors of shape ({z.shape[0]}, k), got {u.shape}")

    def project(v: NDArray[np.float64]) -> NDArray[np.float64]:
        return v - u @ (u.T @ v)

    def deflated(v: NDArray[np.float64]) -> NDArray[np.float64]:
        return project(apply(matvec, project(v)))

    return np.asarray(deflation.eigenvalues, dtype=np.float64), deflated, project(z)


__all__ = ["BREAKDOWN_TOL", "DEFAULT_STEPS", "REORTH_BYTES", "SLQEstimate", "slq_entropy"]
