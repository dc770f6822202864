"""Kernels from per-sample Jacobians: between two input sets, and over any output axes.

``K(x₁, x₂)`` between a test and a training set costs ``N₁ + N₂`` per-sample Jacobians
and one contraction of ``N₁ · N₂`` pairs, never the ``(N₁ + N₂)²`` kernel of the two
sets together. Kernels that keep, trace or diagonalise chosen output axes
(:class:`cvcore.axes.KernelAxes`, neural-tangents' ``trace_axes`` / ``diagonal_axes``)
come from the same Jacobians. Both are computed here from the backend's
:class:`~cvcore.protocols.JacobianBackend` capability (per parameter group, the
per-sample Jacobians of each input set as NumPy) and :func:`cvcore.axes.contract`.

The structured (per-layer) paths build self kernels in cvcore's two conventions only;
a request they cannot serve comes here, to the generic Jacobian path, whatever
``implementation`` says under ``"auto"``; ``implementation="structured"`` with a second
input set or output axes is refused by :func:`cvcore.validate.check_against`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.axes import KernelAxes, contract, cvcore_axes, flat_full, result_shape
from cvcore.data_io import batch_size
from cvcore.errors import BackendError, ModelError, ResourceError
from cvcore.memory import available_memory, ensure_fits
from cvcore.protocols import Backend, JacobianBackend, KernelRequest


@dataclass(frozen=True)
class CrossKernel:
    """A kernel between two input sets (or one set, with chosen output axes).

    Attributes:
        kernel: the kernel: cvcore's ``traced`` ``N₁ × N₂`` or ``full``
            ``(N₁·O) × (N₂·O)`` (row ``i·O + o``) when no axes were named, else
            neural-tangents' layout for ``axes`` (:mod:`cvcore.axes`).
        n_samples: ``(N₁, N₂)``.
        output_shape: the per-sample output shape ``S`` (``O = prod(S)``).
        n_params: trainable parameters ``P``.
        convention: the kernel's convention in words (every output names it).
    """

    kernel: NDArray[np.floating[Any]]
    n_samples: tuple[int, int]
    output_shape: tuple[int, ...]
    n_params: int
    convention: str

    @property
    def n_outputs(self) -> int:
        """``O``: outputs per sample."""
        return int(np.prod(self.output_shape, dtype=np.int64))


def convention(kernel: str, axes: KernelAxes | None) -> str:
    """The convention of a kernel of this module, in words."""
    if axes is not None:
        return f"neural-tangents layout, {axes.describe()}"
    if kernel == "traced":
        return "traced (mean over outputs), N1 x N2"
    return "full, (N1*O) x (N2*O), row i*O + o"


def jacobian_kernel(backend: Backend, model: Any, input_sets: tuple[Any, ...],
                    request: KernelRequest, axes: KernelAxes | None = None) -> CrossKernel:
    """The kernel between the first and the last of ``input_sets`` (one set: its self
    kernel) from the backend's per-sample Jacobians, summed over parameter groups.

    Raises:
        BackendError: the backend has no ``jacobians`` capability.
        ModelError: NaN or Inf in the Jacobians.
    """
    if not isinstance(backend, JacobianBackend):
        raise BackendError(f"expected a backend with per-sample Jacobians (jacobians()), got "
                           f"{getattr(backend, 'name', type(backend).__name__)!r}")
    n1, n2 = batch_size(input_sets[0]), batch_size(input_sets[-1])
    kernel: NDArray[Any] | None = None
    shape: tuple[int, ...] = ()
    n_params = 0
    for group in backend.jacobians(model, tuple(input_sets), request):
        j1, j2 = np.asarray(group[0]), np.asarray(group[-1])
        if kernel is None:
            shape = tuple(int(s) for s in j1.shape[1:-1])
            if axes is None:
                ensure_fits(max(n1, n2), int(np.prod(shape, dtype=np.int64)), request.kernel,
                            np.dtype(request.dtype).itemsize)
            else:
                _ensure_result_fits(result_shape(j1.shape[:-1], j2.shape[:-1], axes),
                                    np.dtype(request.dtype).itemsize)
        for j in (j1, j2):
            if not np.isfinite(j).all():
                bad = np.flatnonzero(~np.isfinite(j.reshape(j.shape[0], -1)).all(axis=1))
                raise ModelError(f"expected finite outputs and gradients, got NaN/Inf for "
                                 f"{bad.size} of {j.shape[0]} samples (indices "
                                 f"{', '.join(map(str, bad[:10]))})")
        chosen = axes if axes is not None else cvcore_axes(request.kernel, j1.ndim - 1)
        kernel = contract(j1, j2, chosen, extra=1, out=kernel)
        n_params += int(j1.shape[-1])
    if kernel is None:
        raise ModelError("expected a model with trainable parameters, got none")
    if axes is None and request.kernel == "full":
        kernel = flat_full(kernel, n1, n2)
    out = np.asarray(kernel, dtype=np.dtype(request.dtype))
    return CrossKernel(kernel=out, n_samples=(n1, n2), output_shape=shape, n_params=n_params,
                       convention=convention(request.kernel, axes))


def _ensure_result_fits(shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse, before any contraction, a kernel with output axes that cannot fit in memory."""
    free = available_memory()
    need = int(np.prod(shape, dtype=np.int64)) * itemsize
    if free is not None and need > free:
        raise ResourceError(f"expected a kernel that fits in memory, got shape {shape} needing "
                            f"{need / 2**30:.1f} GiB with {free / 2**30:.1f} GiB available; "
                            "trace or diagonalise more output axes, or use fewer samples")


def summary(k: CrossKernel) -> dict[str, Any]:
    """Trace-free numbers of a cross kernel (it is not square, or not symmetric): its
    shape, mean, Frobenius norm, and the largest singular value and the mean of the
    singular values of its 2-D form."""
    two_d = k.kernel.reshape(k.kernel.shape[0], -1) if k.kernel.ndim != 2 else k.kernel
    sv = np.linalg.svd(np.asarray(two_d, dtype=np.float64), compute_uv=False)
    return {"shape": list(k.kernel.shape), "convention": k.convention,
            "n_samples": list(k.n_samples), "n_outputs": k.n_outputs, "n_params": k.n_params,
            "mean": float(np.mean(k.kernel, dtype=np.float64)),
            "frobenius": float(np.linalg.norm(np.asarray(k.kernel, dtype=np.float64))),
            "top_singular_value": float(sv[0]) if sv.size else 0.0,
            "mean_singular_value": float(np.mean(sv)) if sv.size else 0.0}


__all__ = ["CrossKernel", "convention", "jacobian_kernel", "summary"]
