"""The public Python API: build a kernel, measure its collective variables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore import plugins
from cvcore.errors import InputError, ModelError
from cvcore.memory import parse_budget
from cvcore.protocols import Implementation, KernelRequest, KernelResult, OutputSelector
from cvcore.spectrum import (
    DIAGONAL_VARIABLES,
    CollectiveVariables,
    DiagonalVariables,
    check_kernel,
    collective_variables,
    diagonal_variables,
)

KERNELS = ("traced", "full")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Measured:
    """A kernel with where it came from: the backend that built it and the request."""

    result: KernelResult
    backend: str
    request: KernelRequest
    #: Which output was measured, in words (an adapter's choice and its defaults).
    output: str | None = None


def describe_output(model: Any, output: OutputSelector | None) -> str | None:
    """Which output a kernel is of: an adapter's description (``cvcore_output`` on the
    model it hands over), else the ``output=`` selector, else ``None`` (the only output)."""
    told = getattr(model, "cvcore_output", None)
    if isinstance(told, str):
        return told
    if output is None:
        return None
    if callable(output):
        return getattr(output, "__name__", type(output).__name__)
    return repr(output)


def make_request(
    *,
    kernel: str = "traced",
    output: OutputSelector | None = None,
    dtype: str | None = None,
    device: str | None = None,
    train: bool = False,
    memory_budget: str | int | None = None,
    implementation: str | Implementation = Implementation.AUTO,
) -> KernelRequest:
    """Validate the options once, in front of every backend."""
    if kernel not in KERNELS:
        raise InputError(f"expected kernel 'traced' or 'full', got {kernel!r}")
    dt = "float32" if dtype is None else str(np.dtype(dtype)) if _is_dtype(dtype) else dtype
    if dt not in DTYPES:
        raise InputError(f"expected dtype 'float32' or 'float64', got {dtype!r}")
    try:
        impl = Implementation(implementation)
    except ValueError:
        raise InputError(
            f"expected implementation among {[i.value for i in Implementation]}, "
            f"got {implementation!r}"
        ) from None
    return KernelRequest(kernel=kernel, output=output, dtype=dt, device=device,  # type: ignore[arg-type]
                         train=train, memory_budget=parse_budget(memory_budget),
                         implementation=impl)


def _is_dtype(value: object) -> bool:
    try:
        np.dtype(value)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


def resolve(model: Any, inputs: Any, request: KernelRequest, backend: str | None
            ) -> tuple[Any, Any, KernelRequest, Any]:
    """Apply the model family's adapter, then pick the backend (named, or by the model)."""
    adapter = plugins.select_adapter(model)
    if adapter is not None:
        model, inputs, output = adapter.adapt(model, inputs, request.output)
        if output is not request.output:
            request = replace(request, output=output)
    chosen = plugins.get_backend(backend) if backend else plugins.select_backend(model)
    return model, inputs, request, chosen


def build(model: Any, inputs: Any, *, backend: str | None = None,
          request: KernelRequest | None = None) -> Measured:
    """Build a kernel and say which backend built it (the CLI's entry point)."""
    model, inputs, req, chosen = resolve(model, inputs, request or make_request(), backend)
    result = chosen.ntk(model, inputs, req)
    kernel = np.asarray(result.kernel)
    expected = result.n_samples * (result.n_outputs if req.kernel == "full" else 1)
    if kernel.shape != (expected, expected):
        raise ModelError(
            f"backend {chosen.name!r} returned a kernel of shape {kernel.shape}, "
            f"expected ({expected}, {expected})"
        )
    return Measured(result=result, backend=chosen.name, request=req,
                    output=describe_output(model, req.output))


def ntk(
    model: Any,
    inputs: Any,
    *,
    kernel: str = "traced",
    backend: str | None = None,
    output: OutputSelector | None = None,
    dtype: str | None = None,
    device: str | None = None,
    train: bool = False,
    memory_budget: str | int | None = None,
    implementation: str | Implementation = Implementation.AUTO,
) -> NDArray[np.floating[Any]]:
    """The empirical NTK of ``model`` on ``inputs``, as a NumPy array.

    Args:
        model: a model of any registered backend's framework.
        inputs: the probe inputs, batch first (a NumPy array, a framework tensor, or a
            dict / tuple of them for models that take several inputs).
        kernel: ``"traced"`` (N × N, averaged over outputs) or ``"full"``
            (N·O × N·O, row index ``i·O + o``).
        backend: a registered backend's name; by default chosen from the model's type.
        output: which output to use when the model returns a tuple, dict or dataclass:
            an index, a key or attribute name, or a callable on the raw output.
        dtype: ``"float32"`` (default) or ``"float64"``.
        device: framework device string; by default the accelerator when one is visible.
        train: measure in training mode instead of eval mode.
        memory_budget: bytes (or ``"512MB"``) one Jacobian block may use; by default a
            quarter of the available memory, at most 4 GiB.
        implementation: see :class:`cvcore.Implementation`.
    """
    req = make_request(kernel=kernel, output=output, dtype=dtype, device=device, train=train,
                       memory_budget=memory_budget, implementation=implementation)
    return build(model, inputs, backend=backend, request=req).result.kernel


def parse_variables(variables: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Validate a selection of variables (a comma list or a sequence of field names)."""
    if variables is None:
        return None
    names = [v.strip() for v in (variables.split(",") if isinstance(variables, str) else variables)]
    known = [f.name for f in fields(CollectiveVariables)]
    unknown = [v for v in names if v not in known]
    if unknown or not names:
        raise InputError(f"expected variables among {known}, got {unknown or names}")
    return tuple(names)


def diagonal_only(variables: tuple[str, ...] | None) -> bool:
    """Whether the selection needs only the kernel's diagonal."""
    return variables is not None and set(variables) <= set(DIAGONAL_VARIABLES)


def build_diagonal(model: Any, inputs: Any, *, backend: str | None = None,
                   request: KernelRequest | None = None) -> tuple[NDArray[Any], str]:
    """``K_ii`` from the backend's ``diagonal`` method when it has one (no kernel is
    formed), else from the kernel; returns the diagonal and the backend's name."""
    model, inputs, req, chosen = resolve(model, inputs, request or make_request(), backend)
    if hasattr(chosen, "diagonal"):
        return np.asarray(chosen.diagonal(model, inputs, req)), chosen.name
    return np.diag(chosen.ntk(model, inputs, req).kernel).copy(), chosen.name


def measure(model: Any, inputs: Any, *, variables: str | Sequence[str] | None = None,
            **options: Any) -> CollectiveVariables | DiagonalVariables:
    """The collective variables of ``model`` on ``inputs``; options as for :func:`ntk`.

    Args:
        variables: the variables wanted (names of :class:`CollectiveVariables` fields). When
            they need only the diagonal (``trace``, ``normalized_trace``, ``self_entropy``,
            ``magnitude_variance``), the kernel is never formed and a
            :class:`DiagonalVariables` is returned.
    """
    wanted = parse_variables(variables)
    if diagonal_only(wanted):
        backend = options.pop("backend", None)
        req = make_request(**options)
        return diagonal_variables(build_diagonal(model, inputs, backend=backend, request=req)[0])
    return collective_variables(ntk(model, inputs, **options))


__all__ = ["Measured", "build", "build_diagonal", "check_kernel", "describe_output",
           "make_request", "measure",
           "ntk", "parse_variables"]
