"""The checks made once, in front of every backend, before any backend is called.

A request is validated once, where it is made: :func:`measure_request` checks every
option (:func:`make_request` the kernel's, :func:`parse_variables` the variables) and
returns a :class:`cvcore.request.MeasureRequest`; nothing downstream checks an option again.

:func:`check_call` runs in :mod:`cvcore.api` (``ntk``, ``measure``, ``build``, the
diagonal, the per-layer kernels, the Recorder) and in :func:`cvcore.estimate.estimate`
(the operator), after the model family's adapter shaped the call and before the backend
sees it, whatever the backend:

* an empty batch is refused (:func:`require_samples`, defined in :mod:`cvcore.data_io`
  beside ``batch_size``, which the probe subset uses too);
* the matrix-free operator is refused in train mode (:func:`require_eval`);
* a kernel that cannot fit in memory is refused (:func:`cvcore.memory.ensure_fits`): the
  traced kernel's size is known from ``N`` alone; the full kernel's (``N·O``) needs the
  number of outputs, which only the backend can probe, so backends call ``ensure_fits``
  once they know ``O``.

A backend called directly (``TorchBackend().ntk(...)``) makes the same checks with the
same one-line calls to these functions, so the messages are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any, Literal

import numpy as np

from cvcore.data_io import batch_size, require_samples
from cvcore.errors import InputError
from cvcore.memory import ensure_fits, parse_budget
from cvcore.protocols import Implementation, KernelRequest, OutputSelector
from cvcore.request import EstimatorOptions, MeasureRequest, Options, Sketch
from cvcore.spectrum import DIAGONAL_VARIABLES, CollectiveVariables

KERNELS = ("traced", "full")
DTYPES = ("float32", "float64")

#: What a call asks of the backend: the kernel, its per-layer split, its diagonal, or the
#: matrix-free operator.
Capability = Literal["ntk", "layers", "diagonal", "operator"]
CAPABILITIES = ("ntk", "layers", "diagonal", "operator")


def sample_count(inputs: Any) -> int | None:
    """``N``, or ``None`` when the inputs' batch size cannot be read here (a form only the
    backend understands; the backend then says what it expected)."""
    try:
        return batch_size(inputs)
    except InputError:
        return None


def require_eval(request: KernelRequest) -> None:
    """Refuse the matrix-free operator in train mode (its products must see one kernel)."""
    if request.train:
        raise InputError("expected train=False for the matrix-free operator (batch statistics "
                         "and dropout change between products), got train=True; use method='exact'")


def check_call(inputs: Any, request: KernelRequest, capability: Capability) -> None:
    """Every check that needs no backend, for one call of ``capability``.

    Raises:
        InputError: an empty batch, or the operator with ``train=True``.
        ResourceError: a traced kernel (``ntk``, ``layers``) too large for memory.
    """
    if capability not in CAPABILITIES:
        raise InputError(f"expected a capability among {list(CAPABILITIES)}, got {capability!r}")
    if capability == "operator":
        require_eval(request)
    n = sample_count(inputs)
    if n is None:
        return
    require_samples(n)
    if capability in ("ntk", "layers") and request.kernel == "traced":
        ensure_fits(n, 1, "traced", np.dtype(request.dtype).itemsize)


def make_request(
    *,
    kernel: str = "traced",
    output: OutputSelector | None = None,
    dtype: str | None = None,
    device: str | None = None,
    train: bool = False,
    memory_budget: str | int | None = None,
    implementation: str | Implementation = Implementation.AUTO,
    family: str | None = None,
    verify: bool = False,
) -> KernelRequest:
    """Validate the kernel's options once, in front of every backend (the keywords are
    :class:`cvcore.request.Options`' fields but ``backend``)."""
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
    if verify and train:
        raise InputError("expected verify without train (it compares eval-mode kernels, where "
                         "each sample is measured alone), got both")
    return KernelRequest(kernel=kernel, output=output, dtype=dt, device=device,  # type: ignore[arg-type]
                         train=train, memory_budget=parse_budget(memory_budget),
                         implementation=impl, family=family, verify=verify)


def _is_dtype(value: object) -> bool:
    try:
        np.dtype(value)  # type: ignore[call-overload]
    except TypeError:
        return False
    return True


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


def measure_request(options: Options | None = None, *,
                    variables: str | Sequence[str] | None = None, per_layer: bool = False,
                    estimator: EstimatorOptions | None = None,
                    sketch: Sketch | None = None,
                    kernel: KernelRequest | None = None) -> MeasureRequest:
    """The one validation of a measurement: every option checked, in this order (the
    per-layer split without variables, the variables, the kernel's options).

    Args:
        options: the measure options as the user wrote them.
        variables: the variables wanted (see :func:`parse_variables`).
        per_layer: also split the kernel by layer.
        estimator: estimate with error bars (already checked when made).
        sketch: the sketched traced kernel.
        kernel: a kernel request already validated (instead of ``options``' kernel ones).

    Raises:
        InputError: an invalid option or combination.
    """
    opts = Options() if options is None else options
    if per_layer and variables is not None:
        raise InputError("expected per_layer without variables, got both")
    wanted = parse_variables(variables)
    req = make_request(**opts.kernel_options()) if kernel is None else kernel
    return MeasureRequest(kernel=req, backend=opts.backend, variables=wanted,
                          per_layer=per_layer, estimator=estimator, sketch=sketch)


__all__ = ["CAPABILITIES", "DTYPES", "KERNELS", "Capability", "check_call", "diagonal_only",
           "make_request", "measure_request", "parse_variables", "require_eval",
           "require_samples", "sample_count"]
