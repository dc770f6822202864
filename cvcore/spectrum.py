"""The spectrum core: every collective variable, computed on NumPy for every framework.

This is the only place in cvcore where eigenvalues, traces and entropies are computed.
Backends hand over a kernel as a NumPy array; :func:`collective_variables` checks it once
and derives everything from one float64 eigendecomposition.

Conventions (see ``docs/concepts.md``):

* eigenvalues are computed in float64 whatever the kernel's dtype and reported in
  descending order;
* eigenvalues below zero by at most ``tolerance * λ_max`` are round-off and are set to
  zero (their number is reported as ``n_zeroed``); a more negative eigenvalue means the
  kernel is not positive semi-definite and is an error;
* ``0 · ln 0 = 0``: zero eigenvalues and zero diagonal entries contribute nothing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cvcore.errors import KernelError, describe

#: Multiplier of the kernel dtype's machine epsilon for the symmetry check.
SYMMETRY_EPS_FACTOR = 1e4
#: Multiplier of ``sqrt(D) * eps(dtype)`` for the round-off tolerance on negative eigenvalues.
NEGATIVE_EPS_FACTOR = 64.0


def _dtype_eps(kernel: NDArray[Any]) -> float:
    if np.issubdtype(kernel.dtype, np.floating):
        return float(np.finfo(kernel.dtype).eps)
    return float(np.finfo(np.float64).eps)


def default_tolerance(dim: int, dtype: Any = np.float64) -> float:
    """The relative tolerance below which negative eigenvalues count as round-off.

    It is ``64 · sqrt(D) · eps(dtype)``: the size of the round-off a Gram matrix of
    dimension ``D`` accumulates in that precision, relative to its largest eigenvalue.

    >>> f"{default_tolerance(100, 'float64'):.3g}"
    '1.42e-13'
    >>> f"{default_tolerance(100, 'float32'):.3g}"
    '7.63e-05'
    """
    eps = float(np.finfo(np.dtype(dtype)).eps) if np.issubdtype(np.dtype(dtype), np.floating) \
        else float(np.finfo(np.float64).eps)
    return NEGATIVE_EPS_FACTOR * math.sqrt(max(dim, 1)) * eps


def check_kernel(kernel: ArrayLike) -> NDArray[np.float64]:
    """Validate a kernel and return it as a symmetric float64 array.

    Args:
        kernel: a square, symmetric, finite matrix.

    Returns:
        The kernel in float64, symmetrized as ``(K + Kᵀ) / 2``.

    Raises:
        KernelError: the kernel is not 2-D and square, has a NaN or Inf, or is not
            symmetric within ``1e4 · eps(dtype)`` relative to its largest entry.

    >>> check_kernel([[2.0, 1.0], [1.0, 2.0]]).dtype
    dtype('float64')
    """
    arr = np.asarray(kernel)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating)
                                   or np.issubdtype(arr.dtype, np.integer)):
        raise KernelError(f"expected a real numeric kernel matrix, got {describe(arr)}")
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise KernelError(f"expected a square 2-D kernel matrix, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise KernelError("expected a kernel with at least one row, got shape (0, 0)")
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise KernelError(
            f"expected a finite kernel, got {bad.shape[0]} NaN/Inf entries "
            f"(first at row {bad[0, 0]}, column {bad[0, 1]})"
        )
    eps = _dtype_eps(arr)
    k64 = arr.astype(np.float64)
    scale = float(np.abs(k64).max())
    asym = float(np.abs(k64 - k64.T).max())
    if asym > SYMMETRY_EPS_FACTOR * eps * scale:
        raise KernelError(
            f"expected a symmetric kernel, got max |K - Kᵀ| = {asym:.3g} "
            f"({asym / scale:.3g} of the largest entry; tolerance "
            f"{SYMMETRY_EPS_FACTOR * eps:.3g})"
        )
    out: NDArray[np.float64] = 0.5 * (k64 + k64.T)
    return out


@dataclass(frozen=True)
class Spectrum:
    """Eigenvalues of a kernel, descending, with round-off negatives set to zero."""

    eigenvalues: NDArray[np.float64]
    n_zeroed: int
    tolerance: float


def eigenvalues(kernel: ArrayLike, *, tolerance: float | None = None) -> Spectrum:
    """Eigenvalues of a kernel in float64, descending, round-off negatives zeroed.

    Args:
        kernel: a symmetric positive semi-definite matrix.
        tolerance: relative tolerance (of the largest eigenvalue) under which a
            negative eigenvalue is round-off; ``None`` uses :func:`default_tolerance`
            for the kernel's size and dtype.

    Raises:
        KernelError: the kernel is invalid (see :func:`check_kernel`) or has an
            eigenvalue more negative than the tolerance allows.

    >>> eigenvalues([[2.0, 0.0], [0.0, 3.0]]).eigenvalues
    array([3., 2.])
    """
    arr = np.asarray(kernel)
    return _spectrum(check_kernel(arr), arr.dtype, tolerance)


def _spectrum(k: NDArray[np.float64], dtype: Any, tolerance: float | None) -> Spectrum:
    """Eigenvalues of an already checked float64 kernel ``k`` that came in ``dtype``."""
    dim = k.shape[0]
    floating = np.issubdtype(dtype, np.floating)
    tol = default_tolerance(dim, dtype if floating else np.float64) if tolerance is None \
        else float(tolerance)
    lam: NDArray[np.float64] = np.linalg.eigvalsh(k)[::-1].astype(np.float64)
    top = float(max(lam[0], 0.0))
    negative = lam < 0
    if negative.any():
        worst = float(lam[-1])
        if top == 0.0 or -worst > tol * top:
            rel = (-worst / top) if top > 0 else math.inf
            raise KernelError(
                f"expected a positive semi-definite kernel, got eigenvalue {worst:.3g} "
                f"({rel:.3g} of the largest; round-off tolerance {tol:.3g})"
            )
    n_zeroed = int(negative.sum())
    lam[negative] = 0.0
    return Spectrum(eigenvalues=lam, n_zeroed=n_zeroed, tolerance=tol)


def _entropy(weights: NDArray[np.float64]) -> float:
    """Shannon entropy (natural log) of non-negative weights, 0·ln 0 = 0."""
    total = float(weights.sum())
    p = weights[weights > 0] / total
    return float(-(p * np.log(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


@dataclass(frozen=True)
class CollectiveVariables:
    """The collective variables of one kernel.

    Attributes:
        trace: ``Tr K``, the sum of the eigenvalues.
        normalized_trace: ``Tr K / D``, the mean eigenvalue (mean diagonal).
        entropy: von Neumann entropy ``-Σ p ln p`` of ``p = λ / Tr K`` (natural log).
        effective_entropy: ``entropy / ln D`` in ``[0, 1]`` (0 when ``D = 1``).
        effective_rank: ``exp(entropy)`` in ``[1, D]``.
        self_entropy: entropy of ``q_i = √K_ii / Σ_j √K_jj``.
        magnitude_variance: variance of ``D · q_i``.
        covariance_entropy: entropy of the cosine-normalized kernel
            ``K_ij / √(K_ii K_jj)`` (rows with ``K_ii = 0`` dropped); NaN when it was
            not asked for (``collective_variables(..., covariance=False)``).
        eigenvalues: all eigenvalues, descending, float64.
        n_zeroed: how many round-off negative eigenvalues were set to zero.
    """

    trace: float
    normalized_trace: float
    entropy: float
    effective_entropy: float
    effective_rank: float
    self_entropy: float
    magnitude_variance: float
    covariance_entropy: float
    eigenvalues: NDArray[np.float64] = field(repr=False)
    n_zeroed: int = 0

    @property
    def dim(self) -> int:
        """``D``, the kernel's dimension."""
        return int(self.eigenvalues.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (eigenvalues as a list), ready for JSON."""
        out = asdict(self)
        out["eigenvalues"] = [float(x) for x in self.eigenvalues]
        return out


#: The scalar variables of :class:`CollectiveVariables` (every field but the eigenvalues):
#: what a record stores per kernel.
SCALARS = tuple(f.name for f in fields(CollectiveVariables) if f.name != "eigenvalues")


def collective_variables(kernel: ArrayLike, *, tolerance: float | None = None,
                         covariance: bool = True) -> CollectiveVariables:
    """Compute every collective variable of a kernel.

    Args:
        kernel: an NTK (either convention), any real dtype; checked once here.
        tolerance: see :func:`eigenvalues`.
        covariance: compute the covariance entropy, which costs a second
            eigendecomposition; when ``False`` it is reported as NaN (not computed) and
            every other variable is unchanged.

    Raises:
        KernelError: the kernel is invalid, or its trace is zero (the entropy is then
            undefined).

    >>> cv = collective_variables(np.eye(4))
    >>> round(cv.entropy, 6), round(cv.effective_entropy, 12), round(cv.effective_rank, 12)
    (1.386294, 1.0, 4.0)
    """
    arr = np.asarray(kernel)
    k = check_kernel(arr)
    spec = _spectrum(k, arr.dtype, tolerance)
    lam = spec.eigenvalues
    dim = lam.shape[0]
    trace = float(lam.sum())
    if not trace > 0.0:
        raise KernelError(
            "expected a kernel with a positive trace, got trace 0 (a zero kernel: "
            "the model's outputs do not depend on its parameters here); "
            "the entropy is undefined"
        )
    entropy = _entropy(lam)
    diag = np.clip(np.diag(k), 0.0, None)
    roots = np.sqrt(diag)
    q = roots / roots.sum()
    self_entropy = _entropy(q)
    magnitude_variance = float(np.var(dim * q))
    covariance_entropy = _covariance_entropy(k, diag, roots) if covariance else math.nan
    return CollectiveVariables(
        trace=trace,
        normalized_trace=trace / dim,
        entropy=entropy,
        effective_entropy=entropy / math.log(dim) if dim > 1 else 0.0,
        effective_rank=math.exp(entropy),
        self_entropy=self_entropy,
        magnitude_variance=magnitude_variance,
        covariance_entropy=covariance_entropy,
        eigenvalues=lam,
        n_zeroed=spec.n_zeroed,
    )


def _covariance_entropy(k: NDArray[np.float64], diag: NDArray[np.float64],
                        roots: NDArray[np.float64]) -> float:
    """Entropy of the cosine-normalized kernel (rows with ``K_ii = 0`` dropped)."""
    keep = diag > 0
    cos = k[np.ix_(keep, keep)] / np.outer(roots[keep], roots[keep])
    cos_lam = np.clip(np.linalg.eigvalsh(0.5 * (cos + cos.T)), 0.0, None)
    return _entropy(cos_lam)


#: The variables that need only the kernel's diagonal (no eigendecomposition).
DIAGONAL_VARIABLES = ("trace", "normalized_trace", "self_entropy", "magnitude_variance")


@dataclass(frozen=True)
class DiagonalVariables:
    """The variables that depend only on the kernel's diagonal ``K_ii``.

    Attributes:
        trace: ``Σ_i K_ii``.
        normalized_trace: ``trace / D``.
        self_entropy: entropy of ``q_i = √K_ii / Σ_j √K_jj``.
        magnitude_variance: variance of ``D · q_i``.
        dim: ``D``, the number of diagonal entries.
    """

    trace: float
    normalized_trace: float
    self_entropy: float
    magnitude_variance: float
    dim: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, ready for JSON."""
        out = asdict(self)
        del out["dim"]
        return out


def diagonal_variables(diagonal: ArrayLike) -> DiagonalVariables:
    """Trace, normalized trace, self-entropy and magnitude variance from ``K_ii`` alone.

    Raises:
        KernelError: the diagonal is empty, not finite, or negative beyond round-off.

    >>> d = diagonal_variables([1.0, 4.0])
    >>> d.trace, d.normalized_trace, round(d.self_entropy, 6)
    (5.0, 2.5, 0.636514)
    """
    diag = np.asarray(diagonal, dtype=np.float64).reshape(-1)
    if diag.size == 0:
        raise KernelError("expected a non-empty kernel diagonal, got 0 entries")
    if not np.isfinite(diag).all():
        raise KernelError(f"expected a finite kernel diagonal, got {int((~np.isfinite(diag)).sum())} NaN/Inf")
    if diag.min() < -1e-6 * max(float(diag.max()), 0.0):
        raise KernelError(f"expected a non-negative kernel diagonal, got {float(diag.min()):.3g}")
    diag = np.clip(diag, 0.0, None)
    trace = float(diag.sum())
    if not trace > 0.0:
        raise KernelError("expected a kernel with a positive trace, got trace 0")
    roots = np.sqrt(diag)
    q = roots / roots.sum()
    return DiagonalVariables(trace=trace, normalized_trace=trace / diag.size,
                             self_entropy=_entropy(q), magnitude_variance=float(np.var(diag.size * q)),
                             dim=int(diag.size))


@dataclass(frozen=True)
class LayerVariables:
    """The collective variables of one layer's kernel ``K_l`` (``K = Σ_l K_l``).

    Attributes:
        layer: the layer's path in the user's model, parts joined by ``.`` (every backend).
        n_params: trainable scalars in the layer.
        trace: ``Tr K_l``.
        share: ``Tr K_l / Tr K``: the layer's part of the model's trace (the shares sum to 1).
        entropy: von Neumann entropy of ``K_l`` (``None`` when ``Tr K_l = 0``).
        effective_rank: ``exp(entropy)`` (``None`` when ``Tr K_l = 0``).
    """

    layer: str
    n_params: int
    trace: float
    share: float
    entropy: float | None
    effective_rank: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "n_params": self.n_params, "trace": self.trace,
                "share": self.share, "entropy": self.entropy, "effective_rank": self.effective_rank}


def layer_variables(layers: list[tuple[str, int, ArrayLike]], *, tolerance: float | None = None
                    ) -> list[LayerVariables]:
    """Trace, share of the total trace, entropy and effective rank of each layer's kernel.

    Args:
        layers: ``(name, n_params, kernel)`` per layer; the model's kernel is their sum.
        tolerance: see :func:`eigenvalues`.

    >>> rows = layer_variables([("a", 2, np.eye(2)), ("b", 1, np.diag([2.0, 0.0]))])
    >>> [(r.layer, r.trace, r.share, round(r.entropy, 6)) for r in rows]
    [('a', 2.0, 0.5, 0.693147), ('b', 2.0, 0.5, 0.0)]
    """
    spectra = []
    for name, n_params, kernel in layers:
        arr = np.asarray(kernel)
        spectra.append((name, n_params, _spectrum(check_kernel(arr), arr.dtype, tolerance)))
    total = sum(float(spec.eigenvalues.sum()) for _, _, spec in spectra)
    rows = []
    for name, n_params, spec in spectra:
        trace = float(spec.eigenvalues.sum())
        entropy = _entropy(spec.eigenvalues) if trace > 0.0 else None
        rows.append(LayerVariables(
            layer=name, n_params=int(n_params), trace=trace,
            share=trace / total if total > 0.0 else 0.0, entropy=entropy,
            effective_rank=math.exp(entropy) if entropy is not None else None))
    return rows
