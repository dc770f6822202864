"""How a kernel lines up with the task: centred kernel-target alignment and residual alignment.

Both take the traced kernel (``N × N``) or the full kernel (``(N·O) × (N·O)``, row
``i·O + o``; or ``(N, O, N, O)``); see :mod:`cvcore.dynamics.inputs` for the layouts.

Centring. ``H = I − 11ᵀ/N`` centres over the samples. For the full kernel the centring is
``H ⊗ I_O``: each output is centred over the samples (the mean function of every output is
removed, never a mean across outputs), and the target kernel is ``vec(Y) vec(Y)ᵀ`` with
``vec(Y)[i·O + o] = Y[i, o]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cvcore.dynamics.eigen import Eigenpairs, top_eigenpairs
from cvcore.dynamics.inputs import (
    F64,
    as_kernel,
    as_targets,
    as_values,
    centring_tolerance,
    check_k,
    is_labels,
    kernel_targets,
)
from cvcore.dynamics.inputs import (
    layout as layout_of,
)
from cvcore.errors import InputError


def centre(kernel: ArrayLike, n: int | None = None) -> F64:
    """``H K H``: the kernel centred over the samples (``H ⊗ I_O`` for a full kernel of ``n``
    samples; ``n = None`` treats the kernel as traced, ``N = D``).

    >>> centre(np.ones((3, 3))).round(12).tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """
    k = as_kernel(kernel)
    dim = k.shape[0]
    n = dim if n is None else n
    o = dim // n
    k4 = k.reshape(n, o, n, o)
    c = (k4 - k4.mean(axis=0, keepdims=True) - k4.mean(axis=2, keepdims=True)
         + k4.mean(axis=(0, 2), keepdims=True))
    out: F64 = c.reshape(dim, dim)
    return out


def target_alignment(kernel: ArrayLike, targets: ArrayLike, *, layout: str | None = None
                     ) -> float:
    """Centred kernel-target alignment
    ``A(K, Y) = ⟨HKH, HYYᵀH⟩_F / (‖HKH‖_F ‖HYYᵀH‖_F)`` (Cortes et al. 2012), in ``[-1, 1]``.

    Args:
        kernel: the traced kernel ``N × N`` or the full kernel ``(N·O) × (N·O)`` (or
            ``(N, O, N, O)``).
        targets: integer class labels ``(N,)`` (one-hot encoded: ``C`` = the largest label + 1
            for the traced kernel, ``C = O`` for the full one), or real targets ``(N,)`` /
            ``(N, C)`` (for the full kernel ``C = O``, flattened sample-major).
        layout: ``"traced"`` or ``"full"`` when the caller knows the kernel's layout
            (``None``: read from the shapes; ``N·C`` targets' rows on a traced kernel of
            ``N·C`` samples are then read as the full kernel of ``N`` samples).

    Returns:
        The alignment; NaN when it is undefined: the centred kernel is zero (a zero or
        constant kernel, or ``N = 1``) or the centred targets are zero (every sample has the
        same target, e.g. a probe subset of one class), each within ``64·sqrt(D)·eps``
        relative round-off.

    Raises:
        InputError: a kernel that is not square, symmetric and finite; targets that are
            not finite or do not match the kernel's samples.

    >>> round(target_alignment(np.outer([1., -1, 1, -1], [1., -1, 1, -1]), [0, 1, 0, 1]), 12)
    1.0
    """
    k, y, kind = kernel_targets(kernel, targets, expected=layout)
    n = y.shape[0]
    yc = y - y.mean(axis=0, keepdims=True)
    kc = centre(k, n)
    tol = centring_tolerance(k.shape[0])
    k_norm = float(np.linalg.norm(kc))
    if not k_norm > tol * float(np.linalg.norm(k)):
        return math.nan
    if not float(np.linalg.norm(yc)) > tol * float(np.linalg.norm(y)):
        return math.nan
    if kind == "full":
        v = yc.reshape(-1)
        inner = float(v @ kc @ v)
        t_norm = float(v @ v)
    else:
        inner = float(np.sum(yc * (kc @ yc)))
        t_norm = float(np.linalg.norm(yc.T @ yc))
    return inner / (k_norm * t_norm)


@dataclass(frozen=True)
class ResidualAlignment:
    """How a residual ``r`` (``f(x) − y``, or ``∂L/∂f``) lies in a kernel's eigenbasis.

    Attributes:
        fractions: ``c(k) = Σ_{i≤k} (u_iᵀ r)² / ‖r‖²`` for ``k = 1 … K``, the eigenvectors
            ``u_i`` in descending order of their eigenvalues; non-decreasing, ``c(D) = 1``.
            For a residual with several columns (``(N, C)`` against a traced kernel) the
            squares are summed over the columns.
        quadratic: ``rᵀKr / (‖r‖² Tr K)``, in ``[0, λ_1/Tr K]``: the rate gradient flow
            shrinks this residual at, relative to the kernel's trace.
        eigenvalues: the top ``K`` eigenvalues, descending (float64; round-off negatives
            set to zero).
        layout: ``"traced"`` or ``"full"``.
    """

    fractions: NDArray[np.float64]
    quadratic: float
    eigenvalues: NDArray[np.float64]
    layout: str


def residual_alignment(kernel: ArrayLike, residual: ArrayLike, k: int | None = None, *,
                       eig: Eigenpairs | None = None, layout: str | None = None
                       ) -> ResidualAlignment:
    """The residual's cumulative share in the top eigen-directions and its Rayleigh quotient.

    Args:
        kernel: the traced kernel ``N × N`` or the full kernel ``(N·O) × (N·O)``.
        residual: ``(N,)`` or ``(N, C)`` real values, never one-hot encoded (for the full
            kernel ``C = O``, flattened sample-major). Against a traced kernel, ``(N, C)``
            gives ``quadratic = Σ_c r_cᵀ K r_c / (‖R‖_F² Tr K)`` (the ``‖R‖²``-weighted mean
            of the columns' quotients, so in the same range as one column's; ``1/C`` of
            the quotient of ``K ⊗ I_C``, whose trace is ``C Tr K``).
        k: how many cumulative fractions; by default all ``D`` (``eig.k`` with ``eig``).
        eig: the kernel's top eigenpairs from :func:`cvcore.dynamics.top_eigenpairs`, when
            the caller has them already (no second decomposition); ``k`` is at most ``eig.k``.
        layout: ``"traced"`` or ``"full"`` when the caller knows the kernel's layout, as
            for :func:`target_alignment`.

    Returns:
        A :class:`ResidualAlignment`. ``fractions`` and ``quadratic`` are NaN when
        ``‖r‖ = 0`` (a perfect fit); both are NaN too for a zero kernel (its eigenvectors
        are arbitrary). Where eigenvalues tie, the terms inside the tied group depend on the
        basis the eigensolver picks; ``c(k)`` at the end of a tied group does not.

    Raises:
        InputError: a bad kernel, a residual that does not match it, ``k`` outside ``[1, D]``
            (or above ``eig.k``), eigenpairs of another dimension.
        KernelError: an eigenvalue more negative than round-off (not positive semi-definite).

    >>> ra = residual_alignment(np.diag([3.0, 1.0]), [1.0, 1.0])
    >>> ra.fractions.tolist(), ra.quadratic
    ([0.5, 1.0], 0.5)
    """
    kk = as_kernel(kernel)
    dim = kk.shape[0]
    r = as_values(residual, "residual")
    kind = layout_of(dim, r.shape[0], r.shape[1], "residual", layout)
    if kind == "full":
        r = r.reshape(-1, 1)
    if eig is None:
        eig = top_eigenpairs(kernel, dim if k is None else k)
    elif eig.dim != dim:
        raise InputError(f"expected eigenpairs of this kernel (dimension {dim}), got "
                         f"eigenpairs of dimension {eig.dim}")
    kmax = check_k(eig.k if k is None else k, eig.k)
    lam, vec = eig.values[:kmax].copy(), eig.vectors[:, :kmax]
    r_sq = float(np.sum(r * r))
    trace = float(np.trace(kk))
    if r_sq == 0.0 or not float(np.abs(kk).max()) > 0.0:
        nan = np.full(kmax, math.nan)
        return ResidualAlignment(nan, math.nan, lam, kind)
    proj = vec.T @ r
    fractions: F64 = np.cumsum(np.sum(proj * proj, axis=1)) / r_sq
    quadratic = float(np.sum(r * (kk @ r))) / (r_sq * trace) if trace > 0 else math.nan
    return ResidualAlignment(fractions, quadratic, lam, kind)


def residual(outputs: ArrayLike, targets: ArrayLike) -> F64:
    """``r = f(x) − y`` as ``(N, O)`` float64: integer labels are one-hot encoded with
    ``O`` classes, real targets must have the outputs' shape (a 1-D target is one column).

    Raises:
        InputError: shapes that do not match, NaN/Inf.

    >>> residual([[0.2, 0.9], [0.6, 0.1]], [1, 0]).round(12).tolist()
    [[0.2, -0.1], [-0.4, 0.1]]
    """
    f = as_values(outputs, "outputs")
    y = as_targets(targets, f.shape[1] if is_labels(targets) else None)
    if y.shape != f.shape:
        raise InputError(f"expected targets of the outputs' shape {f.shape} (or N integer "
                         f"labels below {f.shape[1]}), got shape {y.shape}")
    out: F64 = f - y
    return out
