"""The public Python API: build a kernel, measure its collective variables."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore import plugins
from cvcore import verify as verification
from cvcore.data_io import batch_size
from cvcore.errors import BackendError, InputError, ModelError
from cvcore.memory import failed_allocations, parse_budget
from cvcore.protocols import (
    Implementation,
    KernelRequest,
    KernelResult,
    LayerKernel,
    OutputSelector,
    PerLayerBackend,
)
from cvcore.spectrum import (
    DIAGONAL_VARIABLES,
    CollectiveVariables,
    DiagonalVariables,
    LayerVariables,
    check_kernel,
    collective_variables,
    diagonal_variables,
    layer_variables,
)
from cvcore.validate import check_call

KERNELS = ("traced", "full")
DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Measured:
    """A kernel with where it came from: the backend that built it, the request, and the
    model family and output the adapter chose (``None`` when no adapter was used); with
    ``per_layer``, each layer's kernel too (``result.kernel`` is their sum)."""

    result: KernelResult
    backend: str
    request: KernelRequest
    family: str | None = None
    output: str | None = None
    layers: tuple[LayerKernel, ...] = ()


@dataclass(frozen=True)
class Head:
    """One kernel a model gives: the request that builds it, its family and its output
    in words (an actor-critic gives two heads, ``actor`` and ``critic``)."""

    request: KernelRequest
    family: str | None
    output: str | None


@dataclass(frozen=True)
class Resolved:
    """What the backend measures after the family's adapter shaped the call."""

    model: Any
    inputs: Any
    request: KernelRequest
    backend: Any
    family: str | None
    output: str | None


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
    family: str | None = None,
    verify: bool = False,
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


def output_name(output: OutputSelector | None) -> str | None:
    """An output selector in words, for metadata (``None`` when nothing was chosen)."""
    if output is None or isinstance(output, (int, str)):
        return None if output is None else str(output)
    return getattr(output, "__name__", type(output).__name__)


def resolve_adapted(model: Any, inputs: Any, request: KernelRequest, backend: str | None
                    ) -> Resolved:
    """Apply the model family's adapter (by type, or the one ``request.family`` names),
    then pick the backend (named, or by the model)."""
    adapter = plugins.select_adapter(model, request.family)
    family = label = None
    if adapter is not None:
        asked = request.output
        adapted, adapted_inputs, output = adapter.adapt(model, inputs, asked)
        if output is not request.output:
            request = replace(request, output=output)
        family = plugins.family_of(adapter)
        describe = getattr(adapter, "describe", None)
        told = describe_output(adapted, None)  # the adapted model's own words, if any
        label = (describe(model, inputs, asked) if describe
                 else told if told is not None else output_name(output))
        model, inputs = adapted, adapted_inputs
    else:
        label = output_name(request.output)
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "USO":
        raise InputError(
            f"expected numeric probe inputs for a {type(model).__name__}, got text "
            f"({inputs.shape[0] if inputs.ndim else 1} strings): texts are for a language "
            "model saved with its tokenizer (a save_pretrained directory)")
    chosen = plugins.get_backend(backend) if backend else plugins.select_backend(model)
    return Resolved(model, inputs, request, chosen, family, label)


def resolve(model: Any, inputs: Any, request: KernelRequest, backend: str | None
            ) -> tuple[Any, Any, KernelRequest, Any]:
    """:func:`resolve_adapted` as a tuple ``(model, inputs, request, backend)``."""
    r = resolve_adapted(model, inputs, request, backend)
    return r.model, r.inputs, r.request, r.backend


def heads(model: Any, inputs: Any, request: KernelRequest) -> list[Head]:
    """The kernels a model gives when no output is chosen: one per head of its family
    (an actor-critic's actor and critic), else one."""
    adapter = plugins.select_adapter(model, request.family)
    names = getattr(adapter, "heads", None)
    chosen = ([request] if adapter is None or request.output is not None or names is None
              else [replace(request, output=h) for h in names(model)])
    out = []
    for req in chosen:
        family, label = None, output_name(req.output)
        if adapter is not None:
            family = plugins.family_of(adapter)
            describe = getattr(adapter, "describe", None)
            label = (describe(model, inputs, req.output) if describe
                     else output_name(adapter.adapt(model, inputs, req.output)[2]))
        out.append(Head(req, family, label))
    return out


def build(model: Any, inputs: Any, *, backend: str | None = None,
          request: KernelRequest | None = None, per_layer: bool = False) -> Measured:
    """Build a kernel and say which backend built it (the CLI's entry point); with
    ``per_layer``, from the backend's per-layer kernels (:class:`PerLayerBackend`)."""
    return build_resolved(resolve_adapted(model, inputs, request or make_request(), backend),
                          per_layer=per_layer)


def build_resolved(r: Resolved, *, per_layer: bool = False) -> Measured:
    """:func:`build` for a call already resolved (:func:`resolve_adapted`): the front
    checks (:func:`cvcore.validate.check_call`), then the backend."""
    req, chosen = r.request, r.backend
    check_call(r.inputs, req, "layers" if per_layer else "ntk")
    layers: tuple[LayerKernel, ...] = ()
    with _allocations(r.inputs, req):
        if per_layer:
            result, layers = _by_layer(chosen, r.model, r.inputs, req)
        else:
            result = chosen.ntk(r.model, r.inputs, req)
    kernel = np.asarray(result.kernel)
    expected = result.n_samples * (result.n_outputs if req.kernel == "full" else 1)
    if kernel.shape != (expected, expected):
        raise ModelError(
            f"backend {chosen.name!r} returned a kernel of shape {kernel.shape}, "
            f"expected ({expected}, {expected})"
        )
    if req.verify and req.implementation != Implementation.JACOBIAN:
        verification.check(chosen, r.model, r.inputs, req, result)
    return Measured(result=result, backend=chosen.name, request=req, family=r.family,
                    output=r.output, layers=layers)


def build_all(model: Any, inputs: Any, *, backend: str | None = None,
              request: KernelRequest | None = None, per_layer: bool = False) -> list[Measured]:
    """One :class:`Measured` per head (see :func:`heads`): an actor-critic's actor and
    critic kernels, side by side, when no output is chosen."""
    return [build(model, inputs, backend=backend, request=h.request, per_layer=per_layer)
            for h in heads(model, inputs, request or make_request())]


def _by_layer(chosen: Any, model: Any, inputs: Any, req: KernelRequest
              ) -> tuple[KernelResult, tuple[LayerKernel, ...]]:
    if not isinstance(chosen, PerLayerBackend):
        raise BackendError(f"expected a backend that splits the kernel by layer, got "
                           f"{chosen.name!r}, which has no layer_kernels()")
    split = chosen.layer_kernels(model, inputs, req)
    if not split.layers:
        raise ModelError("expected at least one layer with trainable parameters, got none")
    kernel = np.sum([np.asarray(layer.kernel) for layer in split.layers], axis=0)
    kernel = kernel.astype(np.asarray(split.layers[0].kernel).dtype, copy=False)
    result = KernelResult(kernel=kernel, n_samples=split.n_samples, n_outputs=split.n_outputs,
                          n_params=sum(layer.n_params for layer in split.layers),
                          device=split.device)
    return result, split.layers


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
    family: str | None = None,
    verify: bool = False,
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
        family: the model family whose adapter shapes the call: ``"language"``,
            ``"graph"``, ``"autoencoder"``, ``"rl"`` (see docs/adapters.md for each one's
            outputs and samples), or ``"none"`` for no adapter; by default chosen from the
            model's type. A family with several heads (an actor-critic) gives its first
            head here; :func:`cvcore.api.build_all` gives one kernel per head.
        verify: compare the kernel with the generic Jacobian path on a few random samples
            and raise :class:`cvcore.verify.VerificationError` (naming the layer rules
            involved) when they disagree beyond round-off.
    """
    req = make_request(kernel=kernel, output=output, dtype=dtype, device=device, train=train,
                       memory_budget=memory_budget, implementation=implementation,
                       family=family, verify=verify)
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
    check_call(inputs, req, "diagonal" if hasattr(chosen, "diagonal") else "ntk")
    with _allocations(inputs, req):
        if hasattr(chosen, "diagonal"):
            return np.asarray(chosen.diagonal(model, inputs, req)), chosen.name
        return np.diag(chosen.ntk(model, inputs, req).kernel).copy(), chosen.name


def _allocations(inputs: Any, req: KernelRequest) -> contextlib.AbstractContextManager[None]:
    """A failed allocation while the backend works becomes one ``ResourceError`` line."""
    try:
        n: int | None = batch_size(inputs)
    except Exception:  # noqa: BLE001 - only used to word the message
        n = None
    return failed_allocations(budget=req.memory_budget, samples=n, kernel=req.kernel,
                              itemsize=8 if str(req.dtype).endswith("64") else 4)


@dataclass(frozen=True)
class PerLayer:
    """``measure(..., per_layer=True)``: the model's variables and one row per layer."""

    model: CollectiveVariables
    layers: list[LayerVariables]


def measure(model: Any, inputs: Any, *, variables: str | Sequence[str] | None = None,
            per_layer: bool = False, **options: Any
            ) -> CollectiveVariables | DiagonalVariables | PerLayer:
    """The collective variables of ``model`` on ``inputs``; options as for :func:`ntk`.

    Args:
        variables: the variables wanted (names of :class:`CollectiveVariables` fields). When
            they need only the diagonal (``trace``, ``normalized_trace``, ``self_entropy``,
            ``magnitude_variance``), the kernel is never formed and a
            :class:`DiagonalVariables` is returned. The covariance entropy (a second
            eigendecomposition) is computed only when it is among them or when
            ``variables`` is ``None``; otherwise it is NaN.
            :class:`DiagonalVariables` is returned.
        per_layer: also split the kernel by layer (the layer's path in the user's
            model joined by ``.``, the same rule on every backend; an adapter's wrapper
            prefix is left off): a :class:`PerLayer` with one
            :class:`cvcore.spectrum.LayerVariables` row per layer (parameter count, trace,
            share of the total trace, entropy and effective rank of its own kernel).
    """
    if per_layer:
        if variables is not None:
            raise InputError("expected per_layer without variables, got both")
        backend = options.pop("backend", None)
        measured = build(model, inputs, backend=backend, request=make_request(**options),
                         per_layer=True)
        return PerLayer(model=collective_variables(measured.result.kernel),
                        layers=layer_rows(measured.layers))
    wanted = parse_variables(variables)
    if diagonal_only(wanted):
        backend = options.pop("backend", None)
        req = make_request(**options)
        return diagonal_variables(build_diagonal(model, inputs, backend=backend, request=req)[0])
    covariance = wanted is None or "covariance_entropy" in wanted
    return collective_variables(ntk(model, inputs, **options), covariance=covariance)


def layer_rows(layers: Sequence[LayerKernel]) -> list[LayerVariables]:
    """The per-layer variables of a :class:`Measured`'s layers."""
    return layer_variables([(lk.name, lk.n_params, lk.kernel) for lk in layers])


__all__ = ["Head", "Measured", "PerLayer", "Resolved", "build", "build_all", "build_diagonal",
           "build_resolved", "check_kernel", "describe_output", "heads", "layer_rows",
           "make_request", "measure", "ntk", "parse_variables"]
