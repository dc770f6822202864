"""One eigendecomposition of a kernel, shared by every quantity that needs its eigenvectors.

:func:`top_eigenpairs` decomposes a kernel once (float64, ``numpy.linalg.eigh``) and keeps
the top ``k`` eigenpairs with the eigengap after them; :func:`cvcore.dynamics.residual_alignment`
(``eig=``), :func:`cvcore.dynamics.subspace_overlap` and the top eigenvalues can all use the
same :class:`Eigenpairs`, so a caller that wants several of them (the Recorder, at every
record) decomposes each kernel once.

Eigenvalues follow the spectrum core's convention (:func:`cvcore.spectrum.eigenvalues`):
descending, and negatives of at most ``tolerance · λ_max`` (``64 · sqrt(D) · eps`` of the
kernel's dtype) are round-off and set to zero; a more negative one is a
:class:`~cvcore.errors.KernelError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cvcore.dynamics.inputs import as_kernel, check_k
from cvcore.errors import KernelError
from cvcore.spectrum import default_tolerance


@dataclass(frozen=True)
class Eigenpairs:
    """The top ``k`` eigenpairs of one kernel, from one decomposition.

    Attributes:
        values: ``(k,)`` eigenvalues, descending, round-off negatives set to zero.
        vectors: ``(D, k)`` orthonormal eigenvectors as columns (their signs are the solver's).
        gap: ``(λ_k − λ_{k+1}) / λ_1`` (``λ_{D+1} = 0``): near zero, the top-``k``
            eigenspace is not unique (tied eigenvalues); NaN for a zero kernel.
        trace: ``Tr K`` (the sum of all ``D`` eigenvalues, not only the top ``k``).
    """

    values: NDArray[np.float64]
    vectors: NDArray[np.float64] = field(repr=False)
    gap: float
    trace: float

    @property
    def k(self) -> int:
        """How many eigenpairs."""
        return int(self.values.shape[0])

    @property
    def dim(self) -> int:
        """``D``, the kernel's dimension."""
        return int(self.vectors.shape[0])


def top_eigenpairs(kernel: ArrayLike, k: int | None = None, *,
                   tolerance: float | None = None) -> Eigenpairs:
    """The top ``k`` eigenpairs (all ``D`` by default) of a kernel, from one float64 ``eigh``.

    Args:
        kernel: the traced or full kernel (2-D, or the full kernel as ``(N, O, N, O)``).
        k: how many eigenpairs, in ``[1, D]``.
        tolerance: relative tolerance for round-off negatives (see
            :func:`cvcore.spectrum.eigenvalues`); by default that of the kernel's dtype.

    Raises:
        KernelError: not square, symmetric and finite; an eigenvalue more negative than
            round-off.
        InputError: ``k`` outside ``[1, D]``.

    >>> e = top_eigenpairs(np.diag([1.0, 3.0, 2.0]), 2)
    >>> e.values.tolist(), float(abs(e.vectors[1, 0])), e.gap
    ([3.0, 2.0], 1.0, 0.3333333333333333)
    """
    arr = np.asarray(kernel)
    dtype = arr.dtype if np.issubdtype(arr.dtype, np.floating) else np.dtype(np.float64)
    k64 = as_kernel(arr)
    dim = k64.shape[0]
    kk = check_k(dim if k is None else k, dim)
    lam, vec = np.linalg.eigh(k64)
    lam, vec = lam[::-1].copy(), vec[:, ::-1]
    tol = default_tolerance(dim, dtype) if tolerance is None else float(tolerance)
    top = float(max(lam[0], 0.0))
    if lam[-1] < 0 and (top == 0.0 or -float(lam[-1]) > tol * top):
        rel = -float(lam[-1]) / top if top > 0 else math.inf
        raise KernelError(f"expected a positive semi-definite kernel, got eigenvalue "
                          f"{float(lam[-1]):.3g} ({rel:.3g} of the largest; round-off "
                          f"tolerance {tol:.3g})")
    lam[lam < 0] = 0.0
    nxt = float(lam[kk]) if kk < dim else 0.0
    gap = (float(lam[kk - 1]) - nxt) / top if top > 0 else math.nan
    return Eigenpairs(values=lam[:kk].copy(), vectors=vec[:, :kk].copy(), gap=gap,
                      trace=float(lam.sum()))
