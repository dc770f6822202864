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

from cvcore.axes import KernelAxes
from cvcore.data_io import batch_size, require_samples
from cvcore.errors import InputError
from cvcore.memory import ensure_fits, parse_budget
from cvcore.protocols import Implementation, KernelRequest, OutputSelector
from cvcore.request import EstimatorOptions, MeasureRequest, Options, Sketch, Targets
from cvcore.spectrum import DIAGONAL_VARIABLES, CollectiveVariables

KERNELS = ("traced", "full")
DTYPES = ("float32", "float64")

#: What a call asks of the backend: the kernel, its per-layer split, its diagonal, the
#: matrix-free operator, or the model's outputs.
Capability = Literal["ntk", "layers", "diagonal", "operator", "outputs"]
CAPABILITIES = ("ntk", "layers", "diagonal", "operator", "outputs")


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


def check_targets(targets: Any, n: int | None = None) -> Targets:
    """The probe's targets checked once: 1-D integer (or boolean) class labels ``>= 0``, or
    real targets ``(N,)`` / ``(N, C)``, finite, one row per probe sample (``n``, when the
    inputs' batch size is known). A framework tensor is read back to NumPy.

    Raises:
        InputError: the targets are not such an array, or their length is not ``n``.

    >>> check_targets([0, 2, 1], 3).labels, check_targets([[0.5], [1.5]]).values.shape
    (True, (2, 1))
    """
    raw = targets
    if hasattr(raw, "detach") and hasattr(raw, "cpu"):  # a torch tensor, without importing torch
        raw = raw.detach().cpu().numpy()
    try:
        arr = np.asarray(raw)
    except Exception as exc:  # noqa: BLE001 - reported as one line
        raise InputError(f"expected targets as an array of N labels or values, got "
                         f"{type(targets).__name__} ({exc})") from None
    integer = np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool
    if arr.dtype == object or not (integer or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"expected targets as integer labels or real values, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2) or arr.shape[0] == 0 or (arr.ndim == 2 and arr.shape[1] == 0):
        raise InputError(f"expected targets of shape (N,) or (N, C) with N, C >= 1, got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise InputError(f"expected one target per probe sample ({n}), got {arr.shape[0]} targets")
    if integer and arr.ndim == 1:
        labels = arr.astype(np.int64)
        if int(labels.min()) < 0:
            raise InputError(f"expected class labels >= 0, got {int(labels.min())}")
        return Targets(values=labels, labels=True)
    values = arr.astype(np.float64).reshape(arr.shape[0], -1)
    if not np.isfinite(values).all():
        raise InputError(f"expected finite targets, got {int((~np.isfinite(values)).sum())} NaN/Inf")
    return Targets(values=values, labels=False)


def check_target_count(targets: Targets, n: int) -> None:
    """Refuse targets whose length is not the kernel's number of samples ``n`` (known
    for certain only once the adapter has said what a sample is).

    >>> check_target_count(check_targets([0, 1]), 3)
    Traceback (most recent call last):
    ...
    cvcore.errors.InputError: expected one target per probe sample (3), got 2 targets
    """
    if targets.n != n:
        raise InputError(f"expected one target per probe sample ({n}), got {targets.n} targets")


def diagonal_only(variables: tuple[str, ...] | None) -> bool:
    """Whether the selection needs only the kernel's diagonal."""
    return variables is not None and set(variables) <= set(DIAGONAL_VARIABLES)


def measure_request(options: Options | None = None, *,
                    variables: str | Sequence[str] | None = None, per_layer: bool = False,
                    estimator: EstimatorOptions | None = None,
                    sketch: Sketch | None = None,
                    kernel: KernelRequest | None = None,
                    targets: Targets | None = None,
                    against: Any = None, axes: KernelAxes | None = None) -> MeasureRequest:
    """The one validation of a measurement: every option checked, in this order (the
    per-layer split without variables, the variables, the kernel's options).

    Args:
        options: the measure options as the user wrote them.
        variables: the variables wanted (see :func:`parse_variables`).
        per_layer: also split the kernel by layer.
        estimator: estimate with error bars (already checked when made).
        sketch: the sketched traced kernel.
        kernel: a kernel request already validated (instead of ``options``' kernel ones).
        targets: the probe's targets, checked by :func:`check_targets` (they need the exact
            kernel: not with an estimator or a sketch).
        against: a second input set: the cross kernel ``K(inputs, against)``
            (:func:`check_against`).
        axes: which output axes are traced or kept diagonal (:class:`cvcore.axes.KernelAxes`).

    Raises:
        InputError: an invalid option or combination.
    """
    opts = Options() if options is None else options
    if per_layer and variables is not None:
        raise InputError("expected per_layer without variables, got both")
    if targets is not None and (estimator is not None or sketch is not None):
        raise InputError("expected targets with the exact kernel, got them with "
                         f"{'an estimator' if estimator is not None else 'a sketch'}")
    wanted = parse_variables(variables)
    req = make_request(**opts.kernel_options()) if kernel is None else kernel
    if against is not None or axes is not None:
        check_against(against, req, axes, cross_with=(
            "per_layer" if per_layer else "variables" if variables is not None
            else "an estimator" if estimator is not None else "a sketch" if sketch is not None
            else "targets" if targets is not None else None))
    return MeasureRequest(kernel=req, backend=opts.backend, variables=wanted,
                          per_layer=per_layer, estimator=estimator, sketch=sketch,
                          targets=targets, against=against, axes=axes)


def check_against(against: Any, request: KernelRequest, axes: KernelAxes | None = None,
                  cross_with: str | None = None) -> None:
    """A second input set (or chosen output axes) checked once: a non-empty batch, in eval
    mode, output axes not with ``implementation="structured"`` (its layer rules build the
    traced or full convention only), and nothing asked of it that needs a square kernel.

    Raises:
        InputError: one of those is not so.
    """
    what = "a second input set" if against is not None else "output axes"
    if cross_with is not None:
        raise InputError(f"expected {what} for the kernel alone (cvcore.ntk), got it with "
                         f"{cross_with}")
    if against is not None:
        if isinstance(against, np.ndarray) and against.dtype.kind in "USO":
            raise InputError(f"expected numeric inputs as the second input set, got "
                             f"{against.dtype} values")
        n = sample_count(against)
        if n is not None:
            require_samples(n)
        if request.train:
            raise InputError("expected train=False for a kernel between two input sets (batch "
                             "statistics of one batch do not apply to another), got train=True")
    if request.implementation == Implementation.STRUCTURED and axes is not None:
        raise InputError("expected implementation 'auto' or 'jacobian' with output axes (the "
                         "structured layer rules build kernels in the traced or full "
                         "convention only), got 'structured'")


__all__ = ["CAPABILITIES", "DTYPES", "KERNELS", "Capability", "check_against", "check_call",
           "check_target_count", "check_targets",
           "diagonal_only",
           "make_request", "measure_request", "parse_variables", "require_eval",
           "require_samples", "sample_count"]
