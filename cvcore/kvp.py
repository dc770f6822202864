"""Kernel–vector products without the kernel (neural-tangents' ``empirical_ntk_vp_fn``).

:func:`kernel_operator` hands out the backend's matrix-free operator
(:class:`cvcore.protocols.KernelOperator`, ``K V = J (Jᵀ V)`` by vector–Jacobian and
Jacobian–vector products, the one the stochastic estimators use) for the self kernel of
one input set; :func:`kernel_vector_product` applies it once. A product with the cross
kernel ``K(x₁, x₂) v`` is computed from the per-sample Jacobians one parameter group at a
time (``u = J₂ᵀ v`` then ``J₁ u``), which never forms the ``N₁ × N₂`` kernel either.

Vectors follow the kernel's convention: ``traced`` ``(N,)`` or ``(N, k)``; ``full``
``(N·O,)`` / ``(N·O, k)`` (row ``i·O + o``) or neural-tangents' cotangents shaped like
the output ``(N, *S)`` (the result is then shaped like ``f(x₁)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from cvcore.api import resolve
from cvcore.batch_axes import batch_first
from cvcore.data_io import batch_size
from cvcore.errors import BackendError, InputError
from cvcore.protocols import (
    Implementation,
    JacobianBackend,
    KernelOperator,
    KernelRequest,
    OperatorBackend,
    OutputSelector,
)
from cvcore.request import Options
from cvcore.validate import check_call, measure_request


def _options(kernel: str, output: OutputSelector | None, backend: str | None, dtype: str | None,
             device: str | None, memory_budget: str | int | None, family: str | None) -> Options:
    return Options(kernel=kernel, output=output, backend=backend, dtype=dtype, device=device,
                   memory_budget=memory_budget, family=family,
                   implementation=Implementation.AUTO)


def kernel_operator(model: Any, inputs: Any, *, kernel: str = "traced",
                    output: OutputSelector | None = None, backend: str | None = None,
                    dtype: str | None = None, device: str | None = None,
                    memory_budget: str | int | None = None, family: str | None = None,
                    vmap_axes: Any = 0) -> KernelOperator:
    """The NTK of ``model`` on ``inputs`` as a matrix-free operator: ``op.matvec(V)`` is
    ``K @ V`` for float64 ``V`` ``(D,)`` or ``(D, k)`` (``D = op.dim``: ``N`` traced,
    ``N·O`` full). Eval mode. Options as :func:`cvcore.ntk`.

    Raises:
        BackendError: the backend has no ``operator`` capability.
    """
    model, inputs, _ = batch_first(model, inputs, None, vmap_axes, backend)
    req = measure_request(_options(kernel, output, backend, dtype, device, memory_budget, family))
    r = resolve(model, inputs, req)
    check_call(r.inputs, r.request, "operator")
    if isinstance(r.backend, OperatorBackend):
        return r.backend.operator(r.model, r.inputs, r.request)
    if not isinstance(r.backend, JacobianBackend):
        raise BackendError(f"expected a backend with a matrix-free operator or per-sample "
                           f"Jacobians, got {r.backend.name!r}, which has neither")
    # no vector-Jacobian products in this backend: each product from the Jacobians, one
    # parameter group at a time (the kernel is never formed)
    n = batch_size(r.inputs)
    o = int(np.prod(r.backend.output_shape(r.model, r.inputs, r.request), dtype=np.int64))

    def matvec(vectors: NDArray[np.float64]) -> NDArray[np.float64]:
        return _jacobian_product(r.backend, r.model, (r.inputs,), r.request, vectors)

    return KernelOperator(matvec=matvec, dim=n * (1 if kernel == "traced" else o), n_samples=n,
                          n_outputs=o)


def _as_columns(v: ArrayLike, rows: int, n: int) -> tuple[NDArray[np.float64], Any]:
    """``v`` as ``(rows, k)`` float64 and how to give the result back its shape."""
    a = np.asarray(v, dtype=np.float64)
    if not np.isfinite(a).all():
        raise InputError("expected a finite vector, got NaN or Inf")
    if a.ndim == 1 and a.shape[0] == rows:
        return a[:, None], lambda out: out[:, 0]
    if a.ndim == 2 and a.shape[0] == rows:
        return a, lambda out: out
    if a.ndim >= 1 and a.shape[0] == n and a.size == rows:  # cotangents shaped like f(x)
        shape = a.shape
        return a.reshape(rows, 1), lambda out: out[:, 0].reshape(-1, *shape[1:])
    raise InputError(f"expected a vector of {rows} rows (or {rows} values shaped like the "
                     f"output), got shape {a.shape}")


def kernel_vector_product(model: Any, x1: Any, v: ArrayLike, x2: Any = None, *,
                          kernel: str = "traced", output: OutputSelector | None = None,
                          backend: str | None = None, dtype: str | None = None,
                          device: str | None = None, memory_budget: str | int | None = None,
                          family: str | None = None, vmap_axes: Any = 0
                          ) -> NDArray[np.float64]:
    """``K(x₁, x₂) v`` (``x2=None``: ``K(x₁, x₁) v``) without forming ``K``, float64.

    ``v`` has a row per sample of ``x₂`` (traced) or per sample and output (full; or
    neural-tangents' cotangents ``(N₂, *S)``); the result has a row per sample (and
    output) of ``x₁``. neural-tangents' ``empirical_ntk_vp_fn(f, x1, x2, params)(ct)``
    is ``kernel_vector_product(model, x1, ct, x2, kernel="full")``.
    """
    if x2 is None:
        op = kernel_operator(model, x1, kernel=kernel, output=output, backend=backend,
                             dtype=dtype, device=device, memory_budget=memory_budget,
                             family=family, vmap_axes=vmap_axes)
        cols, back = _as_columns(v, op.dim, op.n_samples)
        return np.asarray(back(op.matvec(cols)), dtype=np.float64)
    model, x1, x2 = batch_first(model, x1, x2, vmap_axes, backend)
    req = measure_request(_options(kernel, output, backend, dtype, device, memory_budget, family),
                          against=x2)
    r = resolve(model, x1, req)
    check_call(r.inputs, r.request, "operator")
    if not isinstance(r.backend, JacobianBackend):
        raise BackendError(f"expected a backend with per-sample Jacobians, got {r.backend.name!r}")
    return _jacobian_product(r.backend, r.model, (r.inputs, r.against), r.request, v)


def _jacobian_product(backend: JacobianBackend, model: Any, sets: tuple[Any, ...],
                      request: KernelRequest, v: ArrayLike) -> NDArray[np.float64]:
    """``K(first, last) v`` from per-sample Jacobians, one parameter group at a time."""
    traced = request.kernel == "traced"
    n2 = batch_size(sets[-1])
    out: NDArray[np.float64] | None = None
    back: Any = None
    for group in backend.jacobians(model, sets, request):
        j1, j2 = group[0], group[-1]
        a1 = np.asarray(j1, dtype=np.float64).reshape(j1.shape[0], -1, j1.shape[-1])
        a2 = np.asarray(j2, dtype=np.float64).reshape(j2.shape[0], -1, j2.shape[-1])
        o = a1.shape[1]
        if back is None:
            cols, back = _as_columns(v, n2 * (1 if traced else o), n2)
        if traced:  # K v = (1/O) Σ_o J_o (J_oᵀ v)
            u = np.einsum("jop,jk->opk", a2, cols)
            part = np.einsum("iop,opk->ik", a1, u) / o
        else:
            u = np.einsum("jop,jok->pk", a2, cols.reshape(n2, o, -1))
            part = np.einsum("iop,pk->iok", a1, u).reshape(a1.shape[0] * o, -1)
        out = part if out is None else out + part
    assert out is not None and back is not None
    return np.asarray(back(out), dtype=np.float64)


__all__ = ["kernel_operator", "kernel_vector_product"]
