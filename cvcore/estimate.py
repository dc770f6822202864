"""Stochastic collective variables for kernels too large to form or diagonalize.

Everything here works on a matrix-free operator ``matvec(V) -> K @ V`` (``V`` of shape
``(D, k)``, several vectors at once) and on NumPy only; a backend supplies the operator
(:class:`KernelOperator`, from its ``operator`` method) and never computes a variable.

* :func:`hutchinson_trace`: ``Tr K`` from Rademacher probes ``z``, ``E[zᵀKz] = Tr K``.
* :func:`slq_entropy`: stochastic Lanczos quadrature of ``Tr f(K)`` with
  ``f(λ) = -(λ/T) ln(λ/T)`` (``0`` for ``λ ≤ 0``), ``T = Tr K``: the von Neumann entropy.
* :func:`randomized_topk`: the largest eigenvalues by the Halko-Martinsson-Tropp
  randomized range finder with power iterations and a Rayleigh-Ritz step.

Each returns an error estimate: the standard error over probes (trace and entropy) or
the residual norm ``‖K q - λ q‖`` of each Ritz pair (a symmetric ``K`` has an eigenvalue
within that distance of ``λ``). :func:`estimate` measures a model, exactly when the kernel
fits (:func:`choose_method`), stochastically otherwise. See ``docs/estimators.md``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from cvcore.api import resolve
from cvcore.errors import BackendError, InputError, KernelError
from cvcore.protocols import KernelOperator, MatVec

#: Anything :func:`numpy.random.default_rng` accepts: a seed, a ``Generator`` or ``None``.
Seed = Any

DEFAULT_PROBES = 32
DEFAULT_STEPS = 40
DEFAULT_TOP_K = 10
DEFAULT_OVERSAMPLE = 10
DEFAULT_POWER_ITERS = 2
#: Largest kernel dimension ``method="auto"`` measures exactly (an eigendecomposition of
#: this size takes minutes on a few CPU cores and about 10 GB in float64).
DEFAULT_MAX_EXACT_DIM = 20000
#: Fraction of the available memory the exact path's kernel and eigensolver may take.
EXACT_MEMORY_FRACTION = 0.5
#: Bytes the stored Lanczos basis may take for full reorthogonalization (``"auto"``).
REORTH_BYTES = 256 << 20
#: A Lanczos run stops when ``β_j`` falls below this fraction of the operator's scale.
BREAKDOWN_TOL = 1e-10
METHODS = ("auto", "exact", "stochastic")
TRACE_ESTIMATORS = ("auto", "diagonal", "hutchinson")


class Estimate(NamedTuple):
    """A stochastic estimate and its standard error."""

    value: float
    stderr: float


class TopK(NamedTuple):
    """Ritz values (descending), the residual norm ``‖K q - λ q‖`` of each pair, and the
    Ritz vectors ``q`` as columns."""

    eigenvalues: NDArray[np.float64]
    residuals: NDArray[np.float64]
    vectors: NDArray[np.float64] | None = None


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


@dataclass(frozen=True)
class EstimatedVariables:
    """Collective variables with error bars, exact or stochastic.

    Attributes:
        trace: ``Tr K``.
        trace_stderr: its standard error (0 when exact or from the kernel's diagonal).
        normalized_trace: ``Tr K / D``.
        entropy: ``S = -Σ p ln p`` of ``p = λ / Tr K`` (natural log).
        entropy_stderr: its standard error (0 when exact).
        effective_rank: ``exp(entropy)``.
        top_eigenvalues: the largest eigenvalues, descending.
        top_residuals: ``‖K q - λ q‖`` per eigenpair (0 when exact); a true eigenvalue
            lies within this distance of each reported one.
        dim: ``D``.
        probes: probe vectors used (0 when exact).
        steps: Lanczos steps per probe, at most (0 when exact).
        method: ``"exact"`` or ``"stochastic"``.
    """

    trace: float
    trace_stderr: float
    normalized_trace: float
    entropy: float
    entropy_stderr: float
    effective_rank: float
    top_eigenvalues: NDArray[np.float64] = field(repr=False)
    top_residuals: NDArray[np.float64] = field(repr=False)
    dim: int
    probes: int
    steps: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (arrays as lists), ready for JSON."""
        out = asdict(self)
        out["top_eigenvalues"] = [float(v) for v in self.top_eigenvalues]
        out["top_residuals"] = [float(v) for v in self.top_residuals]
        return out


# --------------------------------------------------------------------------- helpers


def _check_counts(dim: int, **counts: int) -> None:
    if not isinstance(dim, (int, np.integer)) or dim < 1:
        raise InputError(f"expected a positive operator dimension, got {dim!r}")
    for name, value in counts.items():
        low = 2 if name == "probes" else 1
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise InputError(f"expected {name} to be an integer of at least {low}, got {value!r}")


def _apply(matvec: MatVec, block: NDArray[np.float64]) -> NDArray[np.float64]:
    """``matvec(block)`` in float64, checked for shape and finiteness."""
    out = np.asarray(matvec(block), dtype=np.float64)
    if out.shape != block.shape:
        raise KernelError(f"expected the operator to return shape {block.shape}, got {out.shape}")
    if not np.isfinite(out).all():
        raise KernelError(f"expected finite operator values, got {int((~np.isfinite(out)).sum())} NaN/Inf")
    return out


def _rademacher(rng: np.random.Generator, dim: int, probes: int) -> NDArray[np.float64]:
    return rng.integers(0, 2, size=(dim, probes)).astype(np.float64) * 2.0 - 1.0


def _stderr(samples: NDArray[np.float64]) -> float:
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


def _coldot(a: NDArray[np.float64], b: NDArray[np.float64]) -> NDArray[np.float64]:
    out: NDArray[np.float64] = np.einsum("ij,ij->j", a, b)
    return out


# --------------------------------------------------------------------------- trace


def hutchinson_trace(matvec: MatVec, dim: int, probes: int = DEFAULT_PROBES,
                     rng: Seed = None) -> Estimate:
    """Hutchinson's estimate of ``Tr K`` with Rademacher probes.

    Args:
        matvec: ``K @ V`` for ``V`` of shape ``(dim, probes)``.
        dim: ``D``.
        probes: number of probe vectors (at least 2, for the error estimate).
        rng: seed or ``numpy.random.Generator``.

    Returns:
        The mean of ``zᵀ K z`` over probes and its standard error.

    >>> hutchinson_trace(lambda v: 3.0 * v, 5, probes=4, rng=0)
    Estimate(value=15.0, stderr=0.0)
    """
    _check_counts(dim, probes=probes)
    z = _rademacher(np.random.default_rng(rng), dim, probes)
    samples = _coldot(z, _apply(matvec, z))
    return Estimate(float(samples.mean()), _stderr(samples))


# --------------------------------------------------------------------------- Lanczos


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
        w = _apply(matvec, q)
        a = _coldot(q, w)
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
    _check_counts(dim, probes=probes, steps=steps)
    steps = min(steps, dim)
    if reorthogonalize is None:
        reorthogonalize = steps * dim * probes * 8 <= REORTH_BYTES
    z = _rademacher(np.random.default_rng(rng), dim, probes)
    top, op = np.zeros(0), matvec
    if deflation is not None and deflation.eigenvalues.size:
        top, op, z = _deflate(matvec, deflation, z)
    norms2 = _coldot(z, z)
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
        entropy, stderr = _control_variate(-(l_top + b), a, 1.0 - t_top)
        return SLQEstimate(entropy=entropy, stderr=stderr * widen, trace=scale,
                           trace_stderr=0.0, probes=probes, steps=used)
    entropy, stderr = _ratio_jackknife(t_top + a, l_top + b)
    return SLQEstimate(entropy=entropy, stderr=stderr * widen, trace=scale,
                       trace_stderr=_stderr(rest), probes=probes, steps=used)


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
        return project(_apply(matvec, project(v)))

    return np.asarray(deflation.eigenvalues, dtype=np.float64), deflated, project(z)


def _control_variate(y: NDArray[np.float64], a: NDArray[np.float64], mean_a: float) -> Estimate:
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
        return Estimate(full + 0.0, _stderr(y))
    keep = ~np.eye(m, dtype=bool)
    loo = np.array([fit(y[keep[i]], a[keep[i]]) for i in range(m)])
    stderr = math.sqrt((m - 1) / m * float(((loo - loo.mean()) ** 2).sum()))
    # The fitted coefficient correlates with the probes' mean: an O(1/m) bias, which
    # the jackknife removes to first order.
    corrected = m * full - (m - 1) * float(loo.mean())
    return Estimate(corrected + 0.0, stderr)


def _ratio_jackknife(a: NDArray[np.float64], b: NDArray[np.float64]) -> Estimate:
    """``S = ln Ā - B̄/Ā`` (``a`` samples the trace, ``b`` samples ``Σ λ ln λ``, both in one
    unit) and its jackknife standard error."""
    m = a.size

    def entropy(mean_a: Any, mean_b: Any) -> Any:
        return np.log(mean_a) - mean_b / mean_a

    full = float(entropy(a.mean(), b.mean()))
    loo = entropy((a.sum() - a) / (m - 1), (b.sum() - b) / (m - 1))
    stderr = math.sqrt((m - 1) / m * float(((loo - loo.mean()) ** 2).sum()))
    return Estimate(full + 0.0, stderr)


# --------------------------------------------------------------------------- top-k


def randomized_topk(matvec: MatVec, dim: int, k: int = DEFAULT_TOP_K,
                    oversample: int = DEFAULT_OVERSAMPLE, power_iters: int = DEFAULT_POWER_ITERS,
                    rng: Seed = None) -> TopK:
    """The ``k`` largest eigenvalues of a PSD operator (Halko, Martinsson & Tropp 2011).

    A Gaussian test matrix of ``k + oversample`` columns, ``power_iters`` power iterations
    (each re-orthonormalized), then Rayleigh-Ritz on the captured range:
    ``power_iters + 2`` batched matvecs in all.

    Args:
        matvec: ``K @ V`` for ``V`` of shape ``(dim, k + oversample)``.
        dim: ``D``.
        k: how many eigenvalues (at most ``dim``).
        oversample: extra columns; the error falls like ``(λ_{k+p}/λ_k)^(2q+1)``.
        power_iters: ``q``, the number of power iterations.
        rng: seed or ``numpy.random.Generator``.

    Returns:
        Ritz values, descending, each pair's residual norm ``‖K q - λ q‖`` (a true
        eigenvalue lies within it), and the Ritz vectors.

    >>> top = randomized_topk(lambda v: np.diag([5.0, 3.0, 1.0]) @ v, 3, k=2, rng=0)
    >>> np.round(top.eigenvalues, 12).tolist(), bool(top.residuals.max() < 1e-12)
    ([5.0, 3.0], True)
    """
    _check_counts(dim, k=k, power_iters=power_iters + 1)
    if k > dim:
        raise InputError(f"expected k at most the dimension {dim}, got {k}")
    if oversample < 0:
        raise InputError(f"expected a non-negative oversample, got {oversample}")
    width = min(dim, k + oversample)
    y = _apply(matvec, np.random.default_rng(rng).standard_normal((dim, width)))
    for _ in range(power_iters):
        y = _apply(matvec, np.linalg.qr(y)[0])
    q = np.linalg.qr(y)[0]
    kq = _apply(matvec, q)
    small = q.T @ kq
    theta, u = np.linalg.eigh(0.5 * (small + small.T))
    order = np.argsort(theta)[::-1][:k]
    theta, u = theta[order], u[:, order]
    vectors = q @ u
    residuals = np.linalg.norm(kq @ u - vectors * theta, axis=0)
    return TopK(np.clip(theta, 0.0, None), residuals, vectors)


# --------------------------------------------------------------------------- choice


def choose_method(dim: int, available_bytes: int | None = None, *,
                  max_exact_dim: int = DEFAULT_MAX_EXACT_DIM) -> str:
    """``"exact"`` when a ``D × D`` float64 kernel and its eigendecomposition fit, else
    ``"stochastic"``.

    Exact needs ``D ≤ max_exact_dim`` and ``3 · 8 · D²`` bytes (kernel, float64 copy,
    solver workspace) within ``EXACT_MEMORY_FRACTION`` of ``available_bytes`` (by default
    the memory available now; unknown counts as enough).

    >>> choose_method(1000, 1 << 30), choose_method(30000, 1 << 40), choose_method(8000, 1 << 30)
    ('exact', 'stochastic', 'stochastic')
    """
    from cvcore.memory import available_memory, kernel_bytes

    if dim > max_exact_dim:
        return "stochastic"
    free = available_memory() if available_bytes is None else available_bytes
    if free is not None and kernel_bytes(dim, 1, "traced", 8) > EXACT_MEMORY_FRACTION * free:
        return "stochastic"
    return "exact"


# --------------------------------------------------------------------------- models


def _request(options: dict[str, Any]) -> Any:
    from cvcore.api import make_request

    known = list(inspect.signature(make_request).parameters)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InputError(f"expected options among {known}, got {unknown}")
    return make_request(**options)


def _exact(model: Any, inputs: Any, request: Any, backend: str | None,
           top_k: int) -> EstimatedVariables:
    from cvcore.api import build
    from cvcore.spectrum import collective_variables

    cv = collective_variables(build(model, inputs, backend=backend, request=request).result.kernel)
    top = cv.eigenvalues[: min(top_k, cv.dim)].copy()
    return EstimatedVariables(
        trace=cv.trace, trace_stderr=0.0, normalized_trace=cv.normalized_trace,
        entropy=cv.entropy, entropy_stderr=0.0, effective_rank=cv.effective_rank,
        top_eigenvalues=top, top_residuals=np.zeros_like(top), dim=cv.dim, probes=0, steps=0,
        method="exact")


def _exact_trace(chosen: Any, model: Any, inputs: Any, request: Any, dim: int,
                 trace_estimator: str) -> float | None:
    """``Tr K`` from the backend's ``diagonal`` (no kernel formed), or ``None``."""
    has_diagonal = hasattr(chosen, "diagonal")
    if trace_estimator == "hutchinson" or (trace_estimator == "auto" and not has_diagonal):
        return None
    if not has_diagonal:
        raise BackendError(f"expected a backend with a 'diagonal' method for "
                           f"trace_estimator='diagonal', got backend {chosen.name!r} without one")
    diag = np.asarray(chosen.diagonal(model, inputs, request), dtype=np.float64).reshape(-1)
    if diag.size != dim:
        raise BackendError(f"backend {chosen.name!r} returned a diagonal of {diag.size} entries, "
                           f"expected {dim}")
    return float(diag.sum())


def _stochastic(op: KernelOperator, trace: float | None, probes: int, steps: int, top_k: int,
                oversample: int, power_iters: int, deflate: bool, rng: np.random.Generator
                ) -> EstimatedVariables:
    k = min(top_k, op.dim)
    matvec = _counted(op.matvec, (power_iters + 2 if k > 0 else 0) + min(steps, op.dim))
    top = (randomized_topk(matvec, op.dim, k, oversample, power_iters, rng) if k > 0
           else TopK(np.zeros(0), np.zeros(0)))
    slq = slq_entropy(matvec, op.dim, probes, steps, rng, trace=trace,
                      deflation=top if deflate and k > 0 else None)
    return EstimatedVariables(
        trace=slq.trace, trace_stderr=slq.trace_stderr, normalized_trace=slq.trace / op.dim,
        entropy=slq.entropy, entropy_stderr=slq.stderr, effective_rank=math.exp(slq.entropy),
        top_eigenvalues=top.eigenvalues, top_residuals=top.residuals, dim=op.dim,
        probes=slq.probes, steps=slq.steps, method="stochastic")


def _counted(matvec: MatVec, total: int) -> MatVec:
    """``matvec`` that reports each batched product to :mod:`cvcore.progress`."""
    from cvcore import progress

    if not progress.active():
        return matvec
    done = 0

    def counted(v: NDArray[np.float64]) -> NDArray[np.float64]:
        nonlocal done
        out = matvec(v)
        done += 1
        progress.advance("estimator products", min(done, total), total)
        return out

    return counted


def _check_choices(method: str, trace_estimator: str, top_k: int) -> None:
    if method not in METHODS:
        raise InputError(f"expected method among {list(METHODS)}, got {method!r}")
    if trace_estimator not in TRACE_ESTIMATORS:
        raise InputError(f"expected trace_estimator among {list(TRACE_ESTIMATORS)}, "
                         f"got {trace_estimator!r}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise InputError(f"expected a non-negative integer top_k, got {top_k!r}")


def estimate(model: Any, inputs: Any, *, method: str = "auto", probes: int = DEFAULT_PROBES,
             steps: int = DEFAULT_STEPS, top_k: int = DEFAULT_TOP_K,
             oversample: int = DEFAULT_OVERSAMPLE, power_iters: int = DEFAULT_POWER_ITERS,
             trace_estimator: str = "auto", deflate: bool = True, seed: Seed = 0,
             backend: str | None = None,
             max_exact_dim: int = DEFAULT_MAX_EXACT_DIM, available_bytes: int | None = None,
             **options: Any) -> EstimatedVariables:
    """Trace, entropy and top eigenvalues of ``model``'s NTK on ``inputs``, with error bars.

    Args:
        model: a model of any registered backend's framework.
        inputs: the probe inputs, batch first.
        method: ``"exact"`` (form and diagonalize the kernel), ``"stochastic"``
            (matrix-free estimates; needs a backend with an ``operator`` method) or
            ``"auto"`` (:func:`choose_method` on the kernel's dimension).
        probes: Rademacher probes for the trace and the entropy.
        steps: Lanczos steps per probe.
        top_k: how many of the largest eigenvalues to report.
        oversample: extra columns of the randomized range finder.
        power_iters: power iterations of the randomized range finder.
        trace_estimator: ``"diagonal"`` (exact ``Tr K`` from the backend's ``diagonal``),
            ``"hutchinson"`` (from the probes), or ``"auto"`` (diagonal when available).
        deflate: count the ``top_k`` Ritz pairs exactly and probe only the rest (see
            :func:`slq_entropy`); much smaller errors on NTK spectra.
        seed: seed of the probes.
        backend: a registered backend's name; by default chosen from the model's type.
        max_exact_dim: largest ``D`` that ``"auto"`` measures exactly.
        available_bytes: memory ``"auto"`` may plan with; by default what is free now.
        **options: kernel options as for :func:`cvcore.ntk` (``kernel``, ``output``,
            ``dtype``, ``device``, ``train``, ``memory_budget``, ``implementation``).

    Raises:
        InputError: an option is invalid.
        BackendError: ``method="stochastic"`` with a backend that has no ``operator``.
    """
    _check_choices(method, trace_estimator, top_k)
    request = _request(options)
    if method == "exact":
        return _exact(model, inputs, request, backend, top_k)
    m, x, req, chosen = resolve(model, inputs, request, backend)
    if not hasattr(chosen, "operator"):
        if method == "auto":
            return _exact(model, inputs, request, backend, top_k)
        raise BackendError(f"expected a backend with an 'operator' method for "
                           f"method='stochastic', got backend {chosen.name!r} without one; "
                           "use method='exact'")
    op = chosen.operator(m, x, req)
    if method == "auto" and choose_method(op.dim, available_bytes,
                                          max_exact_dim=max_exact_dim) == "exact":
        return _exact(model, inputs, request, backend, top_k)
    trace = _exact_trace(chosen, m, x, req, op.dim, trace_estimator)
    return _stochastic(op, trace, probes, steps, top_k, oversample, power_iters, deflate,
                       np.random.default_rng(seed))


__all__ = [
    "Estimate",
    "EstimatedVariables",
    "KernelOperator",
    "SLQEstimate",
    "TopK",
    "choose_method",
    "estimate",
    "hutchinson_trace",
    "randomized_topk",
    "slq_entropy",
]
