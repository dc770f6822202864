"""How a kernel moves between two records: kernel distance, velocity, eigenspace rotation.

Kernel distance and velocity follow Fort et al. 2020 (arXiv 2010.15110); the rotation of the
top eigenspace, Atanasov et al. (arXiv 2111.00034). Both kernels must have the same layout
and dimension (the same probe set, the same convention).

Ties. The top-``k`` eigenspace is unique only when ``λ_k > λ_{k+1}``. When the two are equal
(within round-off) any basis of the tied group is as good as another, and the overlap
depends on which one the eigensolver returned: :class:`EigenspaceRotation` reports the
relative gaps ``(λ_k − λ_{k+1}) / λ_1`` of both kernels so a caller can tell; choose ``k``
at a gap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cvcore.dynamics.eigen import top_eigenpairs
from cvcore.dynamics.inputs import F64, as_kernel, check_k
from cvcore.errors import InputError, describe
from cvcore.spectrum import eigenvalues as _eigenvalues


def _pair(a: ArrayLike, b: ArrayLike) -> tuple[F64, F64]:
    ka, kb = as_kernel(a, "first kernel"), as_kernel(b, "second kernel")
    if ka.shape != kb.shape:
        raise InputError(f"expected two kernels of the same shape, got {ka.shape} and {kb.shape}")
    return ka, kb


def kernel_distance(a: ArrayLike, b: ArrayLike) -> float:
    """``d(K_a, K_b) = 1 − ⟨K_a, K_b⟩_F / (‖K_a‖_F ‖K_b‖_F)``: 0 for proportional kernels,
    1 for kernels with no overlap; in ``[0, 1]`` for positive semi-definite kernels
    (``[0, 2]`` in general).

    Returns NaN when either kernel is zero (the cosine is undefined).

    Raises:
        InputError: a kernel that is not square, symmetric and finite, or shapes that differ.

    >>> kernel_distance(np.eye(2), 3 * np.eye(2)), kernel_distance(np.diag([1., 0]), np.diag([0., 1]))
    (0.0, 1.0)
    """
    ka, kb = _pair(a, b)
    na, nb = float(np.linalg.norm(ka)), float(np.linalg.norm(kb))
    if na == 0.0 or nb == 0.0:
        return math.nan
    cos = float(np.sum(ka * kb)) / (na * nb)
    return 1.0 - min(cos, 1.0)  # a cosine above 1 is round-off


def kernel_velocity(a: ArrayLike, b: ArrayLike, gap: float) -> float:
    """``d(K_a, K_b) / gap``: the kernel distance per step, ``gap`` the steps between the two
    records (> 0).

    Raises:
        InputError: ``gap`` not a positive finite number; the kernels as for
            :func:`kernel_distance`.

    >>> kernel_velocity(np.diag([1., 0]), np.diag([0., 1]), 4)
    0.25
    """
    g = _positive_gap(gap)
    return kernel_distance(a, b) / g


def _positive_gap(gap: float) -> float:
    if isinstance(gap, bool) or not isinstance(gap, (int, float, np.integer, np.floating)):
        raise InputError(f"expected a positive number of steps between the records, got {describe(gap)}")
    if not (math.isfinite(float(gap)) and float(gap) > 0):
        raise InputError(f"expected a positive number of steps between the records, got {gap}")
    return float(gap)


def top_eigenvalues(kernel: ArrayLike, k: int | None = None) -> NDArray[np.float64]:
    """The ``k`` largest eigenvalues (all ``D`` by default), descending, float64, with
    round-off negatives set to zero as everywhere in cvcore (:func:`cvcore.spectrum.eigenvalues`).

    Raises:
        InputError: a bad kernel, ``k`` outside ``[1, D]``.

    >>> top_eigenvalues(np.diag([1.0, 3.0, 2.0]), 2).tolist()
    [3.0, 2.0]
    """
    k64 = as_kernel(kernel)
    kk = check_k(k64.shape[0] if k is None else k, k64.shape[0])
    out: F64 = _eigenvalues(k64).eigenvalues[:kk].copy()
    return out


def top_eigenvectors(kernel: ArrayLike, k: int) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The top ``k`` eigenpairs: eigenvalues ``(k,)`` descending (round-off negatives set
    to zero) and orthonormal eigenvectors as the columns of a ``D × k`` array (float64;
    their signs are the solver's). :func:`cvcore.dynamics.top_eigenpairs` gives the eigengap
    and the trace too.

    Raises:
        InputError: a bad kernel, ``k`` outside ``[1, D]``.
    """
    pairs = top_eigenpairs(kernel, k)
    return pairs.values, pairs.vectors


def _basis(u: ArrayLike, what: str) -> F64:
    arr = np.asarray(u, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[1] > arr.shape[0]:
        raise InputError(f"expected {what} as a D × k array of orthonormal columns (1 <= k <= D), "
                         f"got shape {np.asarray(u).shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"expected a finite {what}, got NaN/Inf entries")
    err = float(np.abs(arr.T @ arr - np.eye(arr.shape[1])).max())
    if err > 1e-6:
        raise InputError(f"expected {what} with orthonormal columns, got max |UᵀU − I| = {err:.3g}")
    return arr


def principal_angles(u: ArrayLike, v: ArrayLike) -> NDArray[np.float64]:
    """The principal angles (radians, ascending) between the column spaces of two ``D × k``
    arrays with orthonormal columns. Small angles come from sines (``(I − UUᵀ)V``), large
    ones from cosines (``UᵀV``), accurate at both ends.

    Raises:
        InputError: shapes that differ or columns that are not orthonormal.

    >>> principal_angles([[1.0], [0.0]], [[0.0], [1.0]]).round(12).tolist()
    [1.570796326795]
    """
    a, b = _basis(u, "first basis"), _basis(v, "second basis")
    if a.shape != b.shape:
        raise InputError(f"expected two bases of the same shape, got {a.shape} and {b.shape}")
    cross = a.T @ b
    cos = np.clip(np.linalg.svd(cross, compute_uv=False), 0.0, 1.0)  # descending
    sin = np.clip(np.sort(np.linalg.svd(b - a @ cross, compute_uv=False)), 0.0, 1.0)  # ascending
    out: F64 = np.where(cos * cos >= 0.5, np.arcsin(sin), np.arccos(cos))
    return out


def subspace_overlap(u: ArrayLike, v: ArrayLike) -> float:
    """``‖UᵀV‖_F² / k`` for two ``D × k`` arrays with orthonormal columns: 1 for the same
    subspace, 0 for orthogonal ones; equal to the mean of ``cos² θ_i`` over the principal
    angles.

    >>> subspace_overlap(np.eye(3)[:, :2], np.eye(3)[:, 1:])
    0.5
    """
    a, b = _basis(u, "first basis"), _basis(v, "second basis")
    if a.shape != b.shape:
        raise InputError(f"expected two bases of the same shape, got {a.shape} and {b.shape}")
    return float(np.sum((a.T @ b) ** 2)) / int(a.shape[1])


@dataclass(frozen=True)
class EigenspaceRotation:
    """The top-``k`` eigenspaces of two kernels compared.

    Attributes:
        overlap: ``‖U_aᵀU_b‖_F² / k`` in ``[0, 1]``; NaN when a kernel is zero.
        angles: the ``k`` principal angles (radians, ascending).
        gaps: ``(λ_k − λ_{k+1}) / λ_1`` of each kernel (``λ_{D+1} = 0``); near zero means
            the top-``k`` eigenspace is not unique there and the overlap is not meaningful.
        k: the number of eigenvectors.
    """

    overlap: float
    angles: NDArray[np.float64]
    gaps: tuple[float, float]
    k: int


def eigenspace_rotation(a: ArrayLike, b: ArrayLike, k: int) -> EigenspaceRotation:
    """The overlap, principal angles and eigengaps of two kernels' top-``k`` eigenspaces.

    Raises:
        InputError: bad kernels, shapes that differ, ``k`` outside ``[1, D]``.
    """
    ka, kb = _pair(a, b)
    kk = check_k(k, ka.shape[0])
    ea, eb = top_eigenpairs(a, kk), top_eigenpairs(b, kk)
    gaps = (ea.gap, eb.gap)
    if not (float(np.abs(ka).max()) > 0 and float(np.abs(kb).max()) > 0):
        return EigenspaceRotation(math.nan, np.full(kk, math.nan), gaps, kk)
    u, v = ea.vectors, eb.vectors
    return EigenspaceRotation(float(np.sum((u.T @ v) ** 2)) / kk, principal_angles(u, v), gaps, kk)


def eigenspace_overlap(a: ArrayLike, b: ArrayLike, k: int) -> float:
    """``‖U_aᵀU_b‖_F² / k`` of the two kernels' top-``k`` eigenvectors; NaN when a kernel is
    zero. See :func:`eigenspace_rotation` for the angles and the eigengaps (ties).

    >>> eigenspace_overlap(np.diag([2.0, 1.0]), np.diag([1.0, 2.0]), 1)
    0.0
    """
    return eigenspace_rotation(a, b, k).overlap
