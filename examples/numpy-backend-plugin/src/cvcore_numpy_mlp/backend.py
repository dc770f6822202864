"""The ``numpy-mlp`` backend: analytic Jacobians, blocked by :func:`cvcore.blocking.plan_blocks`.

The kernel is a sum over groups of parameter tensors, ``K = Σ_g J_g J_gᵀ``, and within a
group over pairs of sample blocks; only one or two blocks' Jacobians exist at a time, so
the memory budget bounds Jacobian storage whatever N is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cvcore.blocking import Group, Plan, plan_blocks
from cvcore.errors import InputError, ModelError, describe
from cvcore.memory import ensure_fits
from cvcore.protocols import KernelRequest, KernelResult

from cvcore_numpy_mlp.model import Array, NumpyMLP


class NumpyMLPBackend:
    """Backend for :class:`cvcore_numpy_mlp.NumpyMLP` models.

    ``train`` and ``implementation`` change nothing: the model has no train-mode layers
    and one way to build its kernel. There is one output array, so ``output`` must be
    ``None``; everything runs on the CPU.
    """

    name = "numpy-mlp"
    #: NumPy is always installed with cvcore, so no extra is ever needed.
    extra = ""
    #: A NumpyMLP can only exist once this package is imported.
    modules = ("cvcore_numpy_mlp",)

    def available(self) -> bool:
        return True

    def accepts(self, model: object) -> bool:
        return isinstance(model, NumpyMLP)

    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        if not isinstance(model, NumpyMLP):
            raise ModelError(f"expected a cvcore_numpy_mlp.NumpyMLP, got {describe(model)}")
        check_request(request)
        dtype = np.float64 if request.dtype == "float64" else np.float32
        x = as_inputs(inputs, model.n_inputs, dtype)
        tensors = model.tensors(dtype)
        if not all(np.isfinite(t).all() for t in tensors):
            raise ModelError("expected finite weights, got NaN or Inf")
        n, o = x.shape[0], model.n_outputs
        itemsize = np.dtype(dtype).itemsize
        ensure_fits(n, o, request.kernel, itemsize)
        plan = plan_blocks(n_samples=n, n_outputs=o, group_sizes=[t.size for t in tensors],
                           itemsize=itemsize, budget=request.memory_budget)
        kernel = assemble(model, x, request.kernel == "traced", plan)
        if not np.isfinite(np.diagonal(kernel)).all():
            raise ModelError("expected finite outputs and gradients, got NaN/Inf in the kernel")
        return KernelResult(kernel=kernel, n_samples=n, n_outputs=o, n_params=model.n_params,
                            device="cpu")


def check_request(request: KernelRequest) -> None:
    """Refuse options that make no sense for a NumPy MLP."""
    if request.output is not None:
        raise InputError(f"expected output=None (a numpy-mlp model has one output array), "
                         f"got {request.output!r}")
    if request.device not in (None, "cpu"):
        raise InputError(f"expected device None or 'cpu' for the numpy-mlp backend, "
                         f"got {request.device!r}")


def as_inputs(inputs: Any, n_features: int, dtype: Any) -> Array:
    """Inputs as a 2-D array ``(N, n_features)`` in ``dtype`` (per-sample axes flattened)."""
    if inputs is None or isinstance(inputs, (str, bytes, dict)):
        raise InputError(f"expected inputs as a numeric array of shape (N, {n_features}), "
                         f"got {describe(inputs)}")
    try:
        arr = np.asarray(inputs)
    except ValueError as exc:
        raise InputError(f"expected inputs as a numeric array, got {exc}") from None
    if arr.dtype.kind not in "fiu" or arr.ndim < 2:
        raise InputError(f"expected inputs as a numeric array of shape (N, {n_features}), "
                         f"got {describe(arr)}")
    if arr.shape[0] == 0:
        raise InputError("expected at least one input sample, got an empty batch")
    per_sample = int(np.prod(arr.shape[1:]))
    if per_sample != n_features:
        raise InputError(f"expected {n_features} features per sample, got per-sample shape "
                         f"{arr.shape[1:]}")
    x = arr.reshape(arr.shape[0], n_features).astype(dtype)
    if not np.isfinite(x).all():
        raise InputError("expected finite inputs, got NaN or Inf")
    return x


def jacobian_rows(model: NumpyMLP, x: Array, group: Group, plan: Plan, start: int, stop: int,
                  traced: bool) -> Array:
    """The Jacobian of samples ``[start, stop)`` w.r.t. one group, as kernel rows:
    ``(b, O·P_g)`` for the traced kernel, ``(b·O, P_g)`` for the full one."""
    jac = np.concatenate([model.jacobian(x[a:b], group.members)
                          for a, b in plan.chunks(group, start, stop)])
    return jac.reshape(jac.shape[0], -1) if traced else jac.reshape(-1, jac.shape[2])


def assemble(model: NumpyMLP, x: Array, traced: bool, plan: Plan) -> Array:
    """Accumulate the kernel over parameter groups and pairs of sample blocks."""
    n, o = x.shape[0], model.n_outputs
    width = 1 if traced else o
    kernel = np.zeros((n * width, n * width), dtype=x.dtype)
    scale = 1.0 / o if traced else 1.0
    for group in plan.groups:
        blocks = plan.sample_blocks(group)
        for index, (a0, a1) in enumerate(blocks):
            rows_a = jacobian_rows(model, x, group, plan, a0, a1, traced)
            kernel[a0 * width:a1 * width, a0 * width:a1 * width] += scale * (rows_a @ rows_a.T)
            for b0, b1 in blocks[index + 1:]:
                rows_b = jacobian_rows(model, x, group, plan, b0, b1, traced)
                block = scale * (rows_a @ rows_b.T)
                kernel[a0 * width:a1 * width, b0 * width:b1 * width] += block
                kernel[b0 * width:b1 * width, a0 * width:a1 * width] += block.T
    return kernel
