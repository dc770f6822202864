"""The empirical NNGP kernel: the Gram matrix of a model's outputs (neural-tangents'
``empirical_nngp_fn``).

``K_nngp(x₁, x₂) = f(x₁) · f(x₂)`` contracted over the traced output axes (divided by
their size under ``"mean"``, neural-tangents' convention), diagonal axes paired and kept
axes side by side: the same :class:`cvcore.axes.KernelAxes` and layout as
:func:`cvcore.ntk` with ``trace_axes``. cvcore's conventions apply when no axes are named:
``traced`` ``N₁ × N₂`` (the mean over outputs), ``full`` ``(N₁·O) × (N₂·O)``, row ``i·O + o``.

The outputs come from the backend's ``outputs`` capability
(:func:`cvcore.capabilities.model_outputs`), in the kernel's mode (eval: each sample
alone), for the output ``output=`` selects; their per-sample shape from its
``output_shape`` (:class:`cvcore.protocols.JacobianBackend`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.api import resolve
from cvcore.axes import KernelAxes, contract, cvcore_axes, flat_full
from cvcore.batch_axes import batch_first, output_axis
from cvcore.capabilities import model_outputs
from cvcore.errors import ModelError
from cvcore.protocols import JacobianBackend, OutputSelector
from cvcore.request import Options
from cvcore.validate import check_call, measure_request


def outputs_of(model: Any, inputs: Any, *, output: OutputSelector | None = None,
               backend: str | None = None, dtype: str | None = None, device: str | None = None,
               train: bool = False, family: str | None = None, shaped: bool = True
               ) -> NDArray[np.float64]:
    """The model's outputs ``f(x)`` as float64 NumPy ``(N, *S)`` (``shaped=False``:
    ``(N, O)``), the output the kernel of the same options differentiates."""
    options = Options(backend=backend, output=output, dtype=dtype, device=device, train=train,
                      family=family)
    req = measure_request(options)
    r = resolve(model, inputs, req)
    check_call(r.inputs, r.request, "outputs")
    flat = model_outputs(r.backend, r.model, r.inputs, r.request)
    if not shaped:
        return flat
    shape: tuple[int, ...] = (flat.shape[1],)
    if isinstance(r.backend, JacobianBackend):
        shape = tuple(r.backend.output_shape(r.model, r.inputs, r.request))
    if int(np.prod(shape, dtype=np.int64)) != flat.shape[1]:
        raise ModelError(f"backend returned {flat.shape[1]} outputs per sample for an output of "
                         f"shape {shape}")
    return flat.reshape(flat.shape[0], *shape)


def nngp(model: Any, x1: Any, x2: Any = None, *, kernel: str = "traced",
         trace_axes: int | Sequence[int] | None = None,
         diagonal_axes: int | Sequence[int] | None = None, trace_reduction: str = "mean",
         output: OutputSelector | None = None, backend: str | None = None,
         dtype: str | None = None, device: str | None = None, family: str | None = None,
         vmap_axes: Any = 0) -> NDArray[np.float64]:
    """The empirical NNGP kernel ``f(x₁)·f(x₂)`` (``x2=None``: ``x₁`` with itself), float64.

    Args:
        kernel: cvcore's convention when no axes are named: ``"traced"`` (N₁ × N₂, the
            mean over outputs) or ``"full"`` ((N₁·O) × (N₂·O), row ``i·O + o``).
        trace_axes, diagonal_axes, trace_reduction, vmap_axes: as :func:`cvcore.ntk`
            (neural-tangents' layout when axes are named).
        output, backend, dtype, device, family: as :func:`cvcore.ntk`.
    """
    if kernel not in ("traced", "full"):
        from cvcore.errors import InputError

        raise InputError(f"expected kernel 'traced' or 'full', got {kernel!r}")
    axes = None
    if trace_axes is not None or diagonal_axes is not None or trace_reduction != "mean":
        axes = KernelAxes.make((-1,) if trace_axes is None else trace_axes, diagonal_axes,
                               trace_reduction)
        axes = replace(axes, batch_axis=output_axis(vmap_axes))
    model, x1, x2 = batch_first(model, x1, x2, vmap_axes, backend)
    common: dict[str, Any] = {"output": output, "backend": backend, "dtype": dtype,
                              "device": device, "family": family}
    f1 = outputs_of(model, x1, **common)
    f2 = f1 if x2 is None else outputs_of(model, x2, **common)
    chosen = axes if axes is not None else cvcore_axes(kernel, f1.ndim)
    k = contract(f1, f2, chosen, extra=0)
    if axes is None and kernel == "full":
        k = flat_full(k, f1.shape[0], f2.shape[0])
    return np.asarray(k, dtype=np.float64)


__all__ = ["nngp", "outputs_of"]
