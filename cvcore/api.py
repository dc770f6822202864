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
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.estimate import EstimatedVariables, estimate_resolved
from cvcore.plan import (
    MeasurePlan,
    Resolved,
    bind,
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
from cvcore.request import Compute, MeasureRequest, Options
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
from cvcore.validate import diagonal_only, make_request, measure_request, parse_variables


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
        return bind(model, inputs, request.kernel, request.backend, chosen)[0]


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
            resolved, chosen = bind(model, inputs, req, request.backend, chosen)
            out.append(resolved)
    return out


def execute(r: Resolved, request: MeasureRequest,
            say: Callable[[str], None] | None = None) -> Outcome:
    """Compute what ``request`` asks for on one resolved call (the one dispatch on
    :attr:`~cvcore.request.MeasureRequest.compute`); ``say`` receives the sketch's
    progress lines."""
    compute, name = request.compute, r.backend.name
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
    options = Options(kernel=kernel, backend=backend, output=output, dtype=dtype,
                      device=device, train=train, memory_budget=memory_budget,
                      implementation=implementation, family=family, verify=verify)
    req = measure_request(options)
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
) -> CollectiveVariables | DiagonalVariables | PerLayer:
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
    """
    options = Options(kernel=kernel, backend=backend, output=output, dtype=dtype,
                      device=device, train=train, memory_budget=memory_budget,
                      implementation=implementation, family=family, verify=verify)
    req = measure_request(options, variables=variables, per_layer=per_layer)
    done = execute(resolve(model, inputs, req), req)
    if done.diagonal is not None:
        return diagonal_variables(done.diagonal)
    assert done.result is not None
    if req.per_layer:
        return PerLayer(model=collective_variables(done.result.kernel),
                        layers=layer_rows(done.layers))
    return collective_variables(done.result.kernel, covariance=req.covariance)


def layer_rows(layers: Sequence[LayerKernel]) -> list[LayerVariables]:
    """The per-layer variables of a :class:`Measured`'s layers."""
    return layer_variables([(lk.name, lk.n_params, lk.kernel) for lk in layers])


__all__ = ["Measured", "Outcome", "PerLayer", "Resolved", "build", "build_all", "check_kernel",
           "describe_output", "diagonal_only", "execute", "layer_rows", "make_request",
           "measure", "ntk", "output_name", "parse_variables", "resolve", "resolve_heads"]
