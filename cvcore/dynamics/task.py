"""One kernel measured against the task: what ``cvcore.measure(..., targets=)`` adds.

:func:`task_alignment` takes the kernel (and its per-layer split), the model's outputs
``f(x)`` and the targets, all NumPy, and computes the target alignment, the residual
alignment of ``r = f(x) − y`` and the top eigenvalues in one place, with the convention
they were computed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cvcore.dynamics.alignment import residual, residual_alignment, target_alignment
from cvcore.dynamics.eigen import top_eigenpairs
from cvcore.dynamics.inputs import as_kernel, as_targets, is_labels
from cvcore.errors import InputError

#: How many of the largest eigenvalues :class:`TaskAlignment` keeps.
DEFAULT_TOP_K = 10


@dataclass(frozen=True)
class LayerAlignment:
    """One layer's kernel ``K_l`` against the targets: its centred target alignment."""

    layer: str
    target_alignment: float


@dataclass(frozen=True)
class TaskAlignment:
    """A kernel measured against the targets (``docs/concepts.md``, "Kernel dynamics").

    Attributes:
        target_alignment: centred kernel-target alignment ``A(K, Y)`` (NaN when undefined:
            constant targets or a constant kernel).
        residual_alignment: ``rᵀKr / (‖r‖² Tr K)`` with ``r = f(x) − y`` (NaN when ``r = 0``).
        residual_fractions: ``c(k) = Σ_{i≤k} (u_iᵀ r)² / ‖r‖²`` for every ``k = 1 … D``.
        top_eigenvalues: the ``min(top_k, D)`` largest eigenvalues, descending (float64;
            round-off negatives set to zero).
        residual_norm: ``‖r‖``, the residual's Frobenius norm.
        convention: the kernel, the centring and the targets in words.
        layers: each layer's target alignment (``per_layer=True``), in model order.
    """

    target_alignment: float
    residual_alignment: float
    residual_fractions: NDArray[np.float64] = field(repr=False)
    top_eigenvalues: NDArray[np.float64] = field(repr=False)
    residual_norm: float
    convention: str
    layers: tuple[LayerAlignment, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form, ready for JSON."""
        return {"target_alignment": self.target_alignment,
                "residual_alignment": self.residual_alignment,
                "residual_fractions": [float(v) for v in self.residual_fractions],
                "top_eigenvalues": [float(v) for v in self.top_eigenvalues],
                "residual_norm": self.residual_norm, "convention": self.convention,
                "layers": [{"layer": la.layer, "target_alignment": la.target_alignment}
                           for la in self.layers]}


def convention(kind: str, labels: bool, n_columns: int) -> str:
    """The words every value carries: kernel, centring, targets, residual.

    >>> convention("traced", True, 10)
    'traced kernel (mean over outputs), centred over samples, one-hot targets (10 classes), residual f(x) - y'
    """
    kernel = ("traced kernel (mean over outputs), centred over samples" if kind == "traced"
              else "full kernel (row i*O + o), each output centred over samples")
    targets = (f"one-hot targets ({n_columns} classes)" if labels
               else f"real targets ({n_columns} columns)")
    return f"{kernel}, {targets}, residual f(x) - y"


def task_alignment(kernel: ArrayLike, targets: ArrayLike, outputs: ArrayLike, *,
                   layers: Sequence[tuple[str, ArrayLike]] = (),
                   top_k: int = DEFAULT_TOP_K) -> TaskAlignment:
    """The kernel (and each layer's) against the targets and the residual ``f(x) − y``.

    Args:
        kernel: the traced ``N × N`` or full ``(N·O) × (N·O)`` kernel.
        targets: integer labels ``(N,)`` (one-hot with ``O`` classes, ``O`` the outputs'
            columns) or real targets ``(N,)`` / ``(N, O)``.
        outputs: the model's outputs ``f(x)``, ``(N, O)``.
        layers: ``(name, kernel)`` per layer, in the kernel's convention.
        top_k: how many of the largest eigenvalues to keep (at most ``D``).

    Raises:
        InputError: targets, outputs and kernel that do not match.
    """
    k = as_kernel(kernel)
    f = np.asarray(outputs, dtype=np.float64)
    if f.ndim != 2:
        raise InputError(f"expected outputs of shape (N, O), got shape {f.shape}")
    labels = is_labels(targets)
    r = residual(f, targets)  # checks the targets against the outputs
    y = as_targets(targets, f.shape[1] if labels else None)
    if k.shape[0] not in (f.shape[0], f.size):
        raise InputError(f"expected a kernel over the {f.shape[0]} samples of the outputs "
                         f"(dimension {f.shape[0]} or {f.size}), got dimension {k.shape[0]}")
    kind = "traced" if k.shape[0] == f.shape[0] else "full"  # the outputs settle it
    eig = top_eigenpairs(kernel)  # one decomposition for the fractions and the top values
    ra = residual_alignment(k, r, eig=eig, layout=kind)
    per_layer = tuple(LayerAlignment(name, target_alignment(lk, y, layout=kind))
                      for name, lk in layers)
    top = eig.values[:min(int(top_k), k.shape[0])].copy()
    return TaskAlignment(
        target_alignment=target_alignment(k, y, layout=kind), residual_alignment=ra.quadratic,
        residual_fractions=ra.fractions, top_eigenvalues=top,
        residual_norm=float(np.linalg.norm(r)),
        convention=convention(kind, labels, f.shape[1]), layers=per_layer)
