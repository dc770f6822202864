"""The largest eigenvalues of a PSD operator by the randomized range finder."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import InputError
from cvcore.estimators.common import Seed, apply, check_counts
from cvcore.protocols import MatVec

DEFAULT_TOP_K = 10
DEFAULT_OVERSAMPLE = 10
DEFAULT_POWER_ITERS = 2


class TopK(NamedTuple):
    """Ritz values (descending), the residual norm ``‖K q - λ q‖`` of each pair, and the
    Ritz vectors ``q`` as columns."""

    eigenvalues: NDArray[np.float64]
    residuals: NDArray[np.float64]
    vectors: NDArray[np.float64] | None = None


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
    check_counts(dim, k=k, power_iters=power_iters + 1)
    if k > dim:
        raise InputError(f"expected k at most the dimension {dim}, got {k}")
    if oversample < 0:
        raise InputError(f"expected a non-negative oversample, got {oversample}")
    width = min(dim, k + oversample)
    y = apply(matvec, np.random.default_rng(rng).standard_normal((dim, width)))
    for _ in range(power_iters):
        y = apply(matvec, np.linalg.qr(y)[0])
    q = np.linalg.qr(y)[0]
    kq = apply(matvec, q)
    small = q.T @ kq
    theta, u = np.linalg.eigh(0.5 * (small + small.T))
    order = np.argsort(theta)[::-1][:k]
    theta, u = theta[order], u[:, order]
    vectors = q @ u
    residuals = np.linalg.norm(kq @ u - vectors * theta, axis=0)
    return TopK(np.clip(theta, 0.0, None), residuals, vectors)


__all__ = ["DEFAULT_OVERSAMPLE", "DEFAULT_POWER_ITERS", "DEFAULT_TOP_K", "TopK", "randomized_topk"]
