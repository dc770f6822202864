"""The public Python API: one request in, collective variables out.

Every entry point takes the same path (docs/architecture.md, "One request, one path"):
the options become one validated :class:`cvcore.request.MeasureRequest`
(:func:`cvcore.validate.measure_request`), the request is resolved once into an adapter
and a backend (:mod:`cvcore.plan`), and :func:`execute` computes what the request asks
for (:attr:`cvcore.request.MeasureRequest.compute`): the kernel, its per-layer split, its
diagonal, an estimate or a sketch. :func:`measure` and :func:`ntk` are this path with
keyword options (the fields of :class:`cvcore.request.Options`); ``cv measure``
(:mod:`cvcore.runs`) and the Recorder build their request once and call
:func:`resolve_heads` / :func:`execute` themselves.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.axes import KernelAxes
from cvcore.batch_axes import batch_first, output_axis
from cvcore.capabilities import model_outputs
from cvcore.cross import CrossKernel
from cvcore.dynamics import TaskAlignment, task_alignment
from cvcore.estimate import EstimatedVariables, estimate_resolved
from cvcore.plan import (
    MeasurePlan,
    Resolved,
    allocations,
    bind,
    build_cross,
    build_diagonal,
    build_kernel,
    describe_output,
    head_requests,
    output_name,
)
from cvcore.protocols import (
    Implementation,
    KernelRequest,
    KernelResult,
    LayerKernel,
    OutputSelector,
)
from cvcore.request import Compute, MeasureRequest, Options, Targets
from cvcore.sketch import SketchedKernel, sketch_resolved
from cvcore.spectrum import (
    CollectiveVariables,
    DiagonalVariables,
    LayerVariables,
    check_kernel,
    collective_variables,
    diagonal_variables,
    layer_variables,
)
from cvcore.validate import (
    check_call,
    check_target_count,
    check_targets,
    diagonal_only,
    make_request,
    measure_request,
    parse_variables,
)


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
class Outcome:
    """What :func:`execute` computed for one resolved call: the field of
    :attr:`compute` is set (``result`` for the kernel and the per-layer split)."""

    compute: Compute
    resolved: Resolved
    backend: str
    result: KernelResult | None = None
    layers: tuple[LayerKernel, ...] = ()
    diagonal: NDArray[Any] | None = None
    estimated: EstimatedVariables | None = None
    sketched: SketchedKernel | None = None
    cross: CrossKernel | None = None

    def measured(self) -> Measured:
        """The kernel as a :class:`Measured` (kernel and per-layer computations)."""
        assert self.result is not None
        r = self.resolved
        return Measured(result=self.result, backend=self.backend, request=r.request,
                        family=r.family, output=r.output, layers=self.layers)


def resolve(model: Any, inputs: Any, request: MeasureRequest, chosen: MeasurePlan | None = None
            ) -> Resolved:
    """The request resolved for one call: the family's adapter applied and the backend
    chosen (or those of ``chosen``, a plan made earlier for this kind of model)."""
    with warnings.catch_warnings():
        if request.compute is Compute.SKETCH:  # the adapter's advice to sketch is followed
            warnings.filterwarnings("ignore", message="cvcore: .* backward passes")
        return bind(model, inputs, request.kernel, request.backend, chosen,
                    against=request.against)[0]


def resolve_heads(model: Any, inputs: Any, request: MeasureRequest) -> list[Resolved]:
    """One resolved call per head of the model's family (an actor-critic's actor and
    critic) when no output is chosen, else one; the adapter and the backend are chosen
    once for all of them."""
    adapter, requests = head_requests(model, request.kernel)
    chosen: MeasurePlan | None = MeasurePlan(adapter, None, None)
    out = []
    with warnings.catch_warnings():
        if request.compute is Compute.SKETCH:  # the adapter's advice to sketch is followed
            warnings.filterwarnings("ignore", message="cvcore: .* backward passes")
        for req in requests:
            resolved, chosen = bind(model, inputs, req, request.backend, chosen,
                                    against=request.against)
            out.append(resolved)
    return out


def execute(r: Resolved, request: MeasureRequest,
            say: Callable[[str], None] | None = None) -> Outcome:
    """Compute what ``request`` asks for on one resolved call (the one dispatch on
    :attr:`~cvcore.request.MeasureRequest.compute`); ``say`` receives the sketch's
    progress lines."""
    compute, name = request.compute, r.backend.name
    if compute is Compute.CROSS:
        ck = build_cross(r, request.axes)
        result = KernelResult(kernel=ck.kernel, n_samples=ck.n_samples[0],
                              n_outputs=ck.n_outputs, n_params=ck.n_params)
        return Outcome(compute, r, name, result=result, cross=ck)
    if compute is Compute.ESTIMATE:
        assert request.estimator is not None
        return Outcome(compute, r, name, estimated=estimate_resolved(r, request.estimator))
    if compute is Compute.SKETCH:
        assert request.sketch is not None
        return Outcome(compute, r, name, sketched=sketch_resolved(r, request.sketch, say))
    if compute is Compute.DIAGONAL:
        return Outcome(compute, r, name, diagonal=build_diagonal(r))
    result, layers = build_kernel(r, per_layer=compute is Compute.LAYERS)
    return Outcome(compute, r, name, result=result, layers=layers)


def build(model: Any, inputs: Any, *, backend: str | None = None,
          request: KernelRequest | None = None, per_layer: bool = False) -> Measured:
    """Build a kernel and say which backend built it; with ``per_layer``, from the
    backend's per-layer kernels (:class:`~cvcore.protocols.PerLayerBackend`)."""
    req = measure_request(Options(backend=backend), per_layer=per_layer,
                          kernel=request or make_request())
    return execute(resolve(model, inputs, req), req).measured()


def build_all(model: Any, inputs: Any, *, backend: str | None = None,
              request: KernelRequest | None = None, per_layer: bool = False) -> list[Measured]:
    """One :class:`Measured` per head (see :func:`resolve_heads`): an actor-critic's actor
    and critic kernels, side by side, when no output is chosen."""
    req = measure_request(Options(backend=backend), per_layer=per_layer,
                          kernel=request or make_request())
    return [execute(r, req).measured() for r in resolve_heads(model, inputs, req)]


def ntk(
    model: Any,
    inputs: Any,
    x2: Any = None,
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
    trace_axes: int | Sequence[int] | None = None,
    diagonal_axes: int | Sequence[int] | None = None,
    trace_reduction: str = "mean",
    vmap_axes: Any = 0,
) -> NDArray[np.floating[Any]]:
    """The empirical NTK of ``model`` on ``inputs`` (or between ``inputs`` and ``x2``), as
    a NumPy array.

    Args:
        model: a model of any registered backend's framework.
        inputs: the probe inputs, batch first (a NumPy array, a framework tensor, or a
            dict / tuple of them for models that take several inputs).
        x2: a second input set: the cross kernel ``K(inputs, x2)`` (``N₁ × N₂`` traced,
            ``(N₁·O) × (N₂·O)`` full). Under ``"auto"`` and ``"jacobian"`` from ``N₁ + N₂``
            per-sample Jacobians and ``N₁·N₂`` products (the generic Jacobian path; the
            structured layer rules build self kernels only); ``"structured"`` builds the
            structured self kernel of both sets together and cuts its ``N₁ × N₂`` block
            (``(N₁ + N₂)²`` entries, often faster where the layer rules apply). Eval mode.
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
            involved) when they disagree beyond round-off. A cross kernel under
            ``"structured"`` is verified as the joint kernel it is cut from; under
            ``"auto"`` it is computed by the Jacobian path itself.
        trace_axes, diagonal_axes: neural-tangents' output axes (counted over the batch
            output ``(N, *S)``: ``-1`` the last, ``0`` the batch axis) to trace or to keep
            diagonal; naming either gives neural-tangents' layout (``(N₁, N₂)`` then the
            other output axes, kept ones in pairs) instead of ``kernel``'s; see
            :mod:`cvcore.axes` and docs/neural-tangents.md.
        trace_reduction: ``"mean"`` (neural-tangents' and cvcore's ``traced``: divide by
            the traced size) or ``"sum"`` over the traced axes.
        vmap_axes: where the batch axis is: ``0`` (default), or neural-tangents'
            ``(in_axis, out_axis, {keyword: axis})`` (see :mod:`cvcore.batch_axes`).
    """
    options = Options(kernel=kernel, backend=backend, output=output, dtype=dtype,
                      device=device, train=train, memory_budget=memory_budget,
                      implementation=implementation, family=family, verify=verify)
    axes = None
    if trace_axes is not None or diagonal_axes is not None or trace_reduction != "mean":
        axes = KernelAxes.make((-1,) if trace_axes is None else trace_axes,
                               diagonal_axes, trace_reduction)
        axes = replace(axes, batch_axis=output_axis(vmap_axes))
    model, inputs, x2 = batch_first(model, inputs, x2, vmap_axes, backend)
    req = measure_request(options, against=x2, axes=axes)
    return execute(resolve(model, inputs, req), req).measured().result.kernel


@dataclass(frozen=True)
class PerLayer:
    """``measure(..., per_layer=True)``: the model's variables and one row per layer."""

    model: CollectiveVariables
    layers: list[LayerVariables]


def measure(
    model: Any,
    inputs: Any,
    *,
    variables: str | Sequence[str] | None = None,
    per_layer: bool = False,
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
    targets: Any = None,
) -> CollectiveVariables | DiagonalVariables | PerLayer | Measurement:
    """The collective variables of ``model`` on ``inputs``; options as for :func:`ntk`.

    Args:
        variables: the variables wanted (names of :class:`CollectiveVariables` fields). When
            they need only the diagonal (``trace``, ``normalized_trace``, ``self_entropy``,
            ``magnitude_variance``), the kernel is never formed and a
            :class:`DiagonalVariables` is returned. The covariance entropy (a second
            eigendecomposition) is computed only when it is among them or when
            ``variables`` is ``None``; otherwise it is NaN.
        per_layer: also split the kernel by layer (the layer's path in the user's
            model joined by ``.``, the same rule on every backend; an adapter's wrapper
            prefix is left off): a :class:`PerLayer` with one
            :class:`cvcore.spectrum.LayerVariables` row per layer (parameter count, trace,
            share of the total trace, entropy and effective rank of its own kernel).
        targets: the probe's targets: integer class labels ``(N,)`` (one-hot encoded with
            ``O`` classes) or real targets ``(N,)`` / ``(N, O)``, NumPy or a framework
            tensor. With them the kernel is formed (whatever ``variables`` asks) and the
            model's outputs ``f(x)`` are computed too: a :class:`Measurement` is returned,
            its ``variables`` what the call returns without targets, its ``dynamics`` a
            :class:`cvcore.dynamics.TaskAlignment` (target alignment, residual alignment of
            ``f(x) − y``, top eigenvalues; each layer's target alignment with
            ``per_layer``). Without targets nothing of this is computed.
    """
    options = Options(kernel=kernel, backend=backend, output=output, dtype=dtype,
                      device=device, train=train, memory_budget=memory_budget,
                      implementation=implementation, family=family, verify=verify)
    req = measure_request(options, variables=variables, per_layer=per_layer,
                          targets=None if targets is None else check_targets(targets))
    r = resolve(model, inputs, req)
    done = execute(r, req)
    if done.diagonal is not None:
        return diagonal_variables(done.diagonal)
    assert done.result is not None
    found: CollectiveVariables | PerLayer
    if req.per_layer:
        found = PerLayer(model=collective_variables(done.result.kernel),
                         layers=layer_rows(done.layers))
    else:
        found = collective_variables(done.result.kernel, covariance=req.covariance)
    if req.targets is None:
        return found
    return Measurement(variables=found, dynamics=against_targets(r, req.targets, done))


@dataclass(frozen=True)
class Measurement:
    """``measure(..., targets=)``: the collective variables (what the call returns without
    targets) and the kernel measured against the targets."""

    variables: CollectiveVariables | PerLayer
    dynamics: TaskAlignment


def against_targets(r: Resolved, targets: Targets, done: Outcome) -> TaskAlignment:
    """The kernel of ``done`` (and its layers') against ``targets`` and the residual
    ``f(x) − y``, the outputs computed by the backend that built the kernel, with the
    adapter's output selection (:func:`cvcore.capabilities.model_outputs`)."""
    assert done.result is not None
    check_target_count(targets, done.result.n_samples)
    check_call(r.inputs, r.request, "outputs")
    with allocations(r.inputs, r.request):
        f = model_outputs(r.backend, r.model, r.inputs, r.request)
    return task_alignment(done.result.kernel, targets.values, f,
                          layers=[(lk.name, lk.kernel) for lk in done.layers])


def layer_rows(layers: Sequence[LayerKernel]) -> list[LayerVariables]:
    """The per-layer variables of a :class:`Measured`'s layers."""
    return layer_variables([(lk.name, lk.n_params, lk.kernel) for lk in layers])


__all__ = ["Measured", "Measurement", "Outcome", "PerLayer", "Resolved", "against_targets",
           "build", "build_all", "check_kernel",
           "describe_output", "diagonal_only", "execute", "layer_rows", "make_request",
           "measure", "ntk", "output_name", "parse_variables", "resolve", "resolve_heads"]
