"""A request resolved once: the adapter, the backend, and the backend calls.

:func:`plan` chooses the model family's adapter (by the model's type, or the family the
request names) and the backend (named, or by the adapted model's type) once; a
:class:`MeasurePlan` can be reused for every call on a model of the same structure (the
Recorder keeps one per probe set, :class:`PlanCache`). :func:`bind` applies a plan to one
call: the adapter shapes the model, inputs and output, giving a :class:`Resolved` the
backend measures. The kernel, its per-layer split and its diagonal are built here
(:func:`build_kernel`, :func:`build_layers`, :func:`build_diagonal`), each after the
front checks of :func:`cvcore.validate.check_call`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore import plugins
from cvcore import verify as verification
from cvcore.axes import KernelAxes
from cvcore.capabilities import count_parameters
from cvcore.cross import CrossKernel, convention, jacobian_kernel
from cvcore.data_io import batch_size
from cvcore.errors import BackendError, InputError, ModelError
from cvcore.memory import failed_allocations
from cvcore.protocols import (
    DiagonalBackend,
    Implementation,
    JacobianBackend,
    KernelKind,
    KernelRequest,
    KernelResult,
    LayerKernel,
    OutputSelector,
    PerLayerBackend,
)
from cvcore.validate import check_call


@dataclass(frozen=True)
class MeasurePlan:
    """What a request resolves to for one kind of model: its adapter (``None``: the
    model is measured as called) and the backend that measures the adapted model
    (``None`` while only the adapter is chosen)."""

    adapter: Any | None
    backend: Any
    family: str | None


@dataclass(frozen=True)
class Resolved:
    """One call, shaped by the plan's adapter: what the backend measures.

    Attributes:
        model: the model the backend sees (the adapter's wrapper, or the user's model).
        inputs: the inputs the backend sees.
        request: the kernel request, with the adapter's output selector.
        backend: the backend object.
        family: the model family (``None`` when no adapter was used).
        output: the output measured, in words (the adapter's description, else the
            adapted model's own words, else the selector's).
        head: the output in words as a head of the family names it (the adapter's
            description, else the selector's).
        against: the second input set of a cross kernel as the backend sees it (shaped
            by the same adapter), else ``None``.
    """

    model: Any
    inputs: Any
    request: KernelRequest
    backend: Any
    family: str | None
    output: str | None
    head: str | None = None
    against: Any = None


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


def output_name(output: OutputSelector | None) -> str | None:
    """An output selector in words, for metadata (``None`` when nothing was chosen)."""
    if output is None or isinstance(output, (int, str)):
        return None if output is None else str(output)
    return getattr(output, "__name__", type(output).__name__)


def plan(model: Any, inputs: Any, request: KernelRequest, backend: str | None) -> MeasurePlan:
    """Resolve the adapter and the backend for ``model`` once (see :func:`bind`)."""
    return bind(model, inputs, request, backend)[1]


def bind(model: Any, inputs: Any, request: KernelRequest, backend: str | None,
         chosen: MeasurePlan | None = None, against: Any = None
         ) -> tuple[Resolved, MeasurePlan]:
    """Apply the model family's adapter (by type, or the one ``request.family`` names),
    then pick the backend (named, or by the model); with ``chosen``, its adapter (and its
    backend, when it has one) are used and not chosen again. ``against`` (a cross
    kernel's second input set) is shaped by the same adapter."""
    adapter = (plugins.select_adapter(model, request.family) if chosen is None
               else chosen.adapter)
    family = label = head = None
    if adapter is not None:
        asked = request.output
        adapted, adapted_inputs, output = adapter.adapt(model, inputs, asked)
        if output is not request.output:
            request = replace(request, output=output)
        family = plugins.family_of(adapter)
        describe = adapter.describe
        told = describe_output(adapted, None)  # the adapted model's own words, if any
        head = describe(model, inputs, asked) if describe else output_name(output)
        label = head if describe else told if told is not None else output_name(output)
        if against is not None:
            against = adapter.adapt(model, against, asked)[1]
        model, inputs = adapted, adapted_inputs
    else:
        label = head = output_name(request.output)
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "USO":
        raise InputError(
            f"expected numeric probe inputs for a {type(model).__name__}, got text "
            f"({inputs.shape[0] if inputs.ndim else 1} strings): texts are for a language "
            "model saved with its tokenizer (a save_pretrained directory)")
    if chosen is None or chosen.backend is None:
        picked = plugins.get_backend(backend) if backend else plugins.select_backend(model)
        chosen = MeasurePlan(adapter, picked, family)
    return Resolved(model, inputs, request, chosen.backend, family, label, head,
                    against), chosen


def head_requests(model: Any, request: KernelRequest) -> tuple[Any | None, list[KernelRequest]]:
    """The adapter and one request per head of the model's family (an actor-critic's
    actor and critic) when no output is chosen, else the request alone."""
    adapter = plugins.select_adapter(model, request.family)
    if adapter is None or request.output is not None or adapter.heads is None:
        return adapter, [request]
    return adapter, [replace(request, output=h) for h in adapter.heads(model)]


def structure_key(model: Any, probe_set: str) -> Hashable:
    """A plan's cache key: the model's type (a pair's first item's, for a JAX
    ``(apply_fn, params)``) and the probe set; no object identity."""
    first = model[0] if isinstance(model, tuple) and model else None
    return (type(model), type(first) if first is not None else None,
            getattr(first, "__qualname__", None), probe_set)


class PlanCache:
    """The plans of one Recorder: one per model structure and probe set, so the adapter
    and the backend are chosen once and not at every step. A plan is chosen again when
    the model's trainable parameter count (as its backend tells it) changes."""

    def __init__(self) -> None:
        self._plans: dict[Hashable, tuple[MeasurePlan, int | None]] = {}

    def bind(self, model: Any, inputs: Any, request: KernelRequest, backend: str | None,
             probe_set: str) -> Resolved:
        """:func:`bind` with the cached plan of this model structure and probe set."""
        key = structure_key(model, probe_set)
        cached = self._plans.get(key)
        chosen = None
        if cached is not None and count_parameters(model, cached[0].backend) == cached[1]:
            chosen = cached[0]
        resolved, used = bind(model, inputs, request, backend, chosen)
        if chosen is None:
            self._plans[key] = (used, count_parameters(model, used.backend))
        return resolved

    def backend(self, model: Any, probe_set: str) -> Any:
        """The backend of the plan cached for this structure (``None`` when none is)."""
        cached = self._plans.get(structure_key(model, probe_set))
        return None if cached is None else cached[0].backend

    def count(self, model: Any, probe_set: str) -> int | None:
        """The parameter count the plan of this structure was made for (``None`` when
        no plan is cached yet or the backend cannot tell)."""
        cached = self._plans.get(structure_key(model, probe_set))
        return None if cached is None else cached[1]


def allocations(inputs: Any, req: KernelRequest) -> contextlib.AbstractContextManager[None]:
    """A failed allocation while the backend works becomes one ``ResourceError`` line."""
    try:
        n: int | None = batch_size(inputs)
    except Exception:  # noqa: BLE001 - only used to word the message
        n = None
    return failed_allocations(budget=req.memory_budget, samples=n, kernel=req.kernel,
                              itemsize=8 if str(req.dtype).endswith("64") else 4)


def build_kernel(r: Resolved, *, per_layer: bool = False
                 ) -> tuple[KernelResult, tuple[LayerKernel, ...]]:
    """The kernel of a resolved call after the front checks (with ``per_layer``, as the
    sum of the backend's per-layer kernels, which are returned too); verified against
    the Jacobian path when the request says so."""
    req, chosen = r.request, r.backend
    check_call(r.inputs, req, "layers" if per_layer else "ntk")
    layers: tuple[LayerKernel, ...] = ()
    with allocations(r.inputs, req):
        if per_layer:
            result, layers = build_layers(chosen, r.model, r.inputs, req)
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
    return result, layers


def build_layers(chosen: Any, model: Any, inputs: Any, req: KernelRequest
                 ) -> tuple[KernelResult, tuple[LayerKernel, ...]]:
    """The kernel as the sum of the backend's per-layer kernels, and those kernels."""
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


def build_cross(r: Resolved, axes: KernelAxes | None = None) -> CrossKernel:
    """The kernel from per-sample Jacobians (:mod:`cvcore.cross`) after the front checks:
    ``K(inputs, against)`` for a cross kernel, else the self kernel, in cvcore's convention
    or with ``axes``. The structured paths are never asked: they build self kernels in the
    two conventions only."""
    req = r.request
    check_call(r.inputs, req, "ntk")
    sets = (r.inputs,) if r.against is None else (r.inputs, r.against)
    if r.against is not None and axes is None and req.implementation == Implementation.STRUCTURED:
        return _concatenated(r)
    if r.against is None and axes is not None and isinstance(r.backend, JacobianBackend):
        shape = tuple(r.backend.output_shape(r.model, r.inputs, req))
        same = _as_convention(axes, len(shape) + 1)
        if same is not None:  # a self kernel in cvcore's conventions: the fast paths serve it
            result, _ = build_kernel(replace(r, request=replace(req, kernel=same)))
            k = np.asarray(result.kernel)
            n, o = result.n_samples, result.n_outputs
            if same == "full":
                k = k.reshape(n, o, n, o).transpose(0, 2, 1, 3)
            return CrossKernel(kernel=k, n_samples=(n, n), output_shape=shape,
                               n_params=result.n_params, convention=convention("", axes))
    with allocations(r.inputs, req):
        return jacobian_kernel(r.backend, r.model, sets, req, axes)


def _concatenated(r: Resolved) -> CrossKernel:
    """``implementation="structured"`` for a cross kernel: the structured self kernel of
    both sets together, cut to its ``N₁ × N₂`` block (exact: in eval mode ``K_ij``
    depends on samples ``i`` and ``j`` alone; it costs the ``(N₁ + N₂)²`` kernel)."""
    n1, n2 = batch_size(r.inputs), batch_size(r.against)
    both = _concat(r.inputs, r.against)
    result, _ = build_kernel(replace(r, inputs=both, against=None))
    w = result.n_outputs if r.request.kernel == "full" else 1
    k = np.asarray(result.kernel)[:n1 * w, n1 * w:].copy()
    return CrossKernel(kernel=k, n_samples=(n1, n2), output_shape=(result.n_outputs,),
                       n_params=result.n_params, convention=convention(r.request.kernel, None))


def _concat(a: Any, b: Any) -> Any:
    """Two input sets as one, batch first (NumPy arrays, or dicts / tuples of them)."""
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _concat(a[k], b[k]) for k in a}
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return tuple(_concat(x, y) for x, y in zip(a, b))
    try:
        return np.concatenate([np.asarray(a), np.asarray(b)])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(f"expected two input sets that concatenate along the batch axis for "
                         f"implementation='structured' (NumPy arrays, or dicts / tuples of "
                         f"them), got {type(a).__name__} and {type(b).__name__}: {exc}") from None


def _as_convention(axes: KernelAxes, ndim: int) -> KernelKind | None:
    """``"traced"`` / ``"full"`` when ``axes`` on a flat output ``(N, O)`` are cvcore's
    convention (the last axis averaged, or nothing traced or diagonal), else ``None``."""
    if ndim != 2 or axes.batch_axis % ndim != 0:  # a batch axis last: another layout
        return None
    trace, diag = axes.canonical(ndim)
    if diag:
        return None
    if trace == (1,) and axes.reduction == "mean":
        return "traced"
    return "full" if trace == () else None


def build_diagonal(r: Resolved) -> NDArray[Any]:
    """``K_ii`` from the backend's ``diagonal`` when it has one (no kernel is formed),
    else from the kernel."""
    chosen = r.backend
    has_diagonal = isinstance(chosen, DiagonalBackend)
    check_call(r.inputs, r.request, "diagonal" if has_diagonal else "ntk")
    with allocations(r.inputs, r.request):
        if has_diagonal:
            return np.asarray(chosen.diagonal(r.model, r.inputs, r.request))
        return np.diag(chosen.ntk(r.model, r.inputs, r.request).kernel).copy()


__all__ = ["MeasurePlan", "PlanCache", "Resolved", "allocations", "bind", "build_cross",
           "build_diagonal",
           "build_kernel", "build_layers", "describe_output", "head_requests", "output_name",
           "plan", "structure_key"]
