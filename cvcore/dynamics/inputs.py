"""Checking what the kernel-dynamics functions receive: kernels, targets and residuals.

Layouts (the same as :func:`cvcore.ntk`, see ``docs/concepts.md``):

* the traced kernel is ``N × N``;
* the full kernel is ``(N·O) × (N·O)`` with row index ``i·O + o`` (sample-major), or the same
  numbers as a 4-D array of shape ``(N, O, N, O)``, which is reshaped to the 2-D layout;
* targets and residuals are ``(N,)`` or ``(N, C)``; for the full kernel they are flattened
  sample-major too, entry ``i·O + o`` is ``Y[i, o]`` (so ``C`` must equal ``O``).

Whether a kernel is traced or full is read from its dimension ``D`` and the number of
samples ``N`` of the targets: ``D = N`` is traced, ``D = N·C`` full (the two agree when
``C = 1``).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cvcore.errors import InputError, describe
from cvcore.spectrum import check_kernel

F64 = NDArray[np.float64]


def as_kernel(kernel: ArrayLike, what: str = "kernel") -> F64:
    """A kernel as a checked, symmetric float64 ``D × D`` array (a 4-D ``(N, O, N, O)``
    full kernel is reshaped to ``(N·O) × (N·O)``, row ``i·O + o``).

    Raises:
        KernelError: not square and symmetric, NaN/Inf entries, empty (see
            :func:`cvcore.spectrum.check_kernel`); a 4-D array whose axes do not pair up.

    >>> as_kernel(np.ones((2, 1, 2, 1))).shape
    (2, 2)
    """
    arr = np.asarray(kernel)
    if arr.ndim == 4:
        n, o, n2, o2 = arr.shape
        if (n, o) != (n2, o2):
            raise InputError(f"expected a 4-D {what} of shape (N, O, N, O), got shape {arr.shape}")
        arr = arr.reshape(n * o, n * o)
    return check_kernel(arr)


def one_hot(labels: ArrayLike, n_classes: int | None = None) -> F64:
    """Integer class labels ``(N,)`` as a float64 one-hot matrix ``(N, C)``.

    Args:
        labels: integers in ``[0, C)``.
        n_classes: ``C``; by default ``max(labels) + 1``.

    Raises:
        InputError: labels that are not 1-D integers, negative, or not below ``n_classes``.

    >>> one_hot([0, 2, 1]).tolist()
    [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    """
    arr = np.asarray(labels)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise InputError(f"expected 1-D integer class labels, got {describe(arr)}")
    if arr.size == 0:
        raise InputError("expected at least one class label, got none")
    arr = arr.astype(np.int64)
    if int(arr.min()) < 0:
        raise InputError(f"expected class labels >= 0, got {int(arr.min())}")
    top = int(arr.max()) + 1
    c = top if n_classes is None else int(n_classes)
    if c < top:
        raise InputError(f"expected class labels below {c} (the number of classes), got {top - 1}")
    out: F64 = np.zeros((arr.size, c), dtype=np.float64)
    out[np.arange(arr.size), arr] = 1.0
    return out


def is_labels(targets: ArrayLike) -> bool:
    """Whether ``targets`` are class labels (1-D integers or booleans), which are one-hot
    encoded, rather than regression values (floats, or any 2-D array), which are used as is."""
    arr = np.asarray(targets)
    return arr.ndim == 1 and (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool)


def as_targets(targets: ArrayLike, n_classes: int | None = None, what: str = "targets") -> F64:
    """Targets as a float64 ``(N, C)`` matrix: 1-D integer labels one-hot encoded (``C`` from
    ``n_classes`` or the labels), 1-D floats as one column, 2-D arrays as they are.

    Raises:
        InputError: not 1-D or 2-D, empty, not real numbers, or NaN/Inf.

    >>> as_targets(np.array([0.5, 1.5])).shape, as_targets([1, 0]).shape
    ((2, 1), (2, 2))
    """
    arr = np.asarray(targets)
    if is_labels(arr):
        return one_hot(arr, n_classes)
    return as_values(arr, what)


def as_values(values: ArrayLike, what: str = "residual") -> F64:
    """Real values (a residual, a loss gradient, regression targets) as a float64 ``(N, C)``
    matrix: a 1-D array as one column, never one-hot encoded.

    Raises:
        InputError: not 1-D or 2-D, empty, not real numbers, or NaN/Inf.
    """
    arr = np.asarray(values)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating)
                                   or np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"expected real-valued {what}, got {describe(arr)}")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputError(f"expected {what} of shape (N,) or (N, C) with N, C >= 1, "
                         f"got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError(f"expected finite {what}, got {int((~np.isfinite(arr)).sum())} NaN/Inf")
    out: F64 = arr.astype(np.float64)
    return out


def layout(dim: int, n: int, c: int, what: str = "targets", expected: str | None = None
           ) -> str:
    """``"traced"`` when a kernel of dimension ``dim`` is ``N × N``, ``"full"`` when it is
    ``(N·C) × (N·C)``; an :class:`InputError` otherwise. ``expected`` (the kernel's layout,
    when the caller knows it) settles the one ambiguous case, ``N·C`` rows of a traced
    kernel read as ``N`` samples of ``C`` outputs, and refuses a mismatch."""
    if expected is not None:
        if expected not in ("traced", "full"):
            raise InputError(f"expected layout 'traced' or 'full', got {expected!r}")
        if dim == (n if expected == "traced" else n * c):
            return expected
        rows = dim if expected == "traced" else f"{dim}/O"
        raise InputError(f"expected {what} for the {expected} kernel's samples ({rows} rows), "
                         f"got {what} of shape ({n}, {c})")
    if dim == n:
        return "traced"
    if dim == n * c:
        return "full"
    raise InputError(
        f"expected {what} for the kernel's samples: a kernel of dimension {dim} needs "
        f"{dim} rows (traced) or N rows of {dim}/N columns (full, row i·O + o), got {what} "
        f"of shape ({n}, {c})")


def kernel_targets(kernel: ArrayLike, targets: ArrayLike, what: str = "targets",
                   expected: str | None = None) -> tuple[F64, F64, str]:
    """The checked kernel, the targets as ``(N, C)`` float64 (labels one-hot with ``C = O``
    for the full kernel), and the layout (``"traced"`` or ``"full"``; ``expected`` when
    the caller knows it, see :func:`layout`)."""
    k = as_kernel(kernel)
    dim = k.shape[0]
    raw = np.asarray(targets)
    if is_labels(raw):
        n = raw.shape[0]
        full = expected == "full" or (expected is None and n and dim != n)
        n_classes = dim // n if full and n and dim % n == 0 else None
        y = as_targets(raw, n_classes, what)
    else:
        y = as_targets(raw, None, what)
    return k, y, layout(dim, y.shape[0], y.shape[1], what, expected)


def centring_tolerance(dim: int) -> float:
    """Relative size under which a centred matrix counts as zero (round-off of centring):
    ``64 · sqrt(D) · eps(float64)``."""
    return 64.0 * float(np.sqrt(max(dim, 1))) * float(np.finfo(np.float64).eps)


def check_k(k: int, dim: int, what: str = "k") -> int:
    """``k`` as an int in ``[1, dim]``; an :class:`InputError` otherwise."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InputError(f"expected an integer {what}, got {describe(k)}")
    if not 1 <= int(k) <= dim:
        raise InputError(f"expected {what} between 1 and the kernel's dimension {dim}, got {k}")
    return int(k)
