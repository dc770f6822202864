"""Kernel dynamics on NumPy (float64): how a kernel lines up with the task and how it moves.

* alignment: :func:`target_alignment` (centred kernel-target alignment),
  :func:`residual_alignment` (a residual's share in the top eigen-directions and its
  Rayleigh quotient), :func:`one_hot`, :func:`residual`, :func:`centre`;
* motion: :func:`kernel_distance`, :func:`kernel_velocity`, :func:`eigenspace_overlap`,
  :func:`eigenspace_rotation`, :func:`subspace_overlap`, :func:`principal_angles`;
* spectra: :func:`top_eigenpairs` (one decomposition, reusable: ``residual_alignment(...,
  eig=)``), :func:`top_eigenvalues`, :func:`top_eigenvectors`;
* a kernel against the task, what ``cvcore.measure(..., targets=)`` adds:
  :func:`task_alignment` (:class:`TaskAlignment`).

No framework is imported here; every function takes NumPy (or array-like) kernels in
cvcore's layouts (:mod:`cvcore.dynamics.inputs`). Definitions, conventions and degenerate
cases: ``docs/concepts.md``, "Kernel dynamics".
"""

from __future__ import annotations

from cvcore.dynamics.alignment import (
    ResidualAlignment,
    centre,
    residual,
    residual_alignment,
    target_alignment,
)
from cvcore.dynamics.eigen import Eigenpairs, top_eigenpairs
from cvcore.dynamics.inputs import as_kernel, as_targets, one_hot
from cvcore.dynamics.motion import (
    EigenspaceRotation,
    eigenspace_overlap,
    eigenspace_rotation,
    kernel_distance,
    kernel_velocity,
    principal_angles,
    subspace_overlap,
    top_eigenvalues,
    top_eigenvectors,
)
from cvcore.dynamics.task import DEFAULT_TOP_K, LayerAlignment, TaskAlignment, task_alignment

__all__ = [
    "DEFAULT_TOP_K",
    "Eigenpairs",
    "EigenspaceRotation",
    "LayerAlignment",
    "ResidualAlignment",
    "TaskAlignment",
    "as_kernel",
    "as_targets",
    "centre",
    "eigenspace_overlap",
    "eigenspace_rotation",
    "kernel_distance",
    "kernel_velocity",
    "one_hot",
    "principal_angles",
    "residual",
    "residual_alignment",
    "subspace_overlap",
    "target_alignment",
    "task_alignment",
    "top_eigenpairs",
    "top_eigenvalues",
    "top_eigenvectors",
]
