"""The sketched traced kernel: an unbiased estimate from ``m`` random projections of the outputs.

The exact traced kernel ``K = (1/O) Σ_o J_o J_oᵀ`` costs ``O`` backward passes per sample,
which is prohibitive for a language model's vocabulary (``O = 50257`` for GPT-2). With
Rademacher vectors ``s_k ∈ {±1}^O`` (``k = 1..m``) and projected outputs
``z_k = s_kᵀ f / √O``, every projection gives a rank-one-per-pair kernel
``K_k = ∇z_k ∇z_kᵀ`` with ``E[K_k] = (1/O) Σ_o J_o J_oᵀ = K`` (because
``E[s_ok s_o'k] = δ_oo'``). Their mean ``K̂ = (1/m) Σ_k K_k`` is unbiased and costs ``m``
backward passes per sample; the ``K_k`` are independent, so their spread gives the
standard error of every entry, and leave-one-projection-out (jackknife) estimates give
the standard errors of the trace and the entropy.

Two pieces live here, both backend-neutral: :class:`Projection`, an output transform a
backend applies like any other ``output=`` callable (it only uses ``reshape`` and ``@``
on the framework's array, with the matrix converted by the backend's ``as_array``,
:func:`cvcore.capabilities.as_array`), and
the statistics on NumPy (:func:`sketch_statistics`, :func:`projections_for`).
:func:`sketched_kernel` puts them together for any model a backend measures.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.capabilities import as_array
from cvcore.errors import InputError, describe
from cvcore.plan import Resolved, bind, describe_output
from cvcore.protocols import KernelRequest, OutputSelector
from cvcore.request import Sketch
from cvcore.validate import check_call, make_request

#: Projections of the pilot run when only a target error is given.
PILOT_PROJECTIONS = 8
#: Most projections a target error may ask for.
MAX_PROJECTIONS = 4096


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not isinstance(value, Mapping)


@dataclass
class Projection:
    """An output transform: ``z = f Sᵀ / √O`` with ``S`` a ``m × O`` Rademacher matrix.

    The matrix is drawn from ``seed`` the first time the output size ``O`` is seen and
    reused afterwards, so every chunk, block and trace of a backend sees the same ``S``.

    Attributes:
        base: the output to project (``None`` for a model with one output), chosen as
            :func:`cvcore.outputs.select_output` does.
        projections: ``m``.
        seed: the seed of ``S``; seeds ``(seed, block)`` give independent blocks.
        block: which block of projections (a target error adds blocks).
        backend: the backend that measures the model: it turns the matrix into the
            framework's array (:func:`cvcore.capabilities.as_array`).
    """

    base: OutputSelector | None
    projections: int
    seed: int = 0
    block: int = 0
    backend: Any = field(default=None, repr=False, compare=False)
    _matrices: dict[int, NDArray[np.float64]] = field(default_factory=dict, repr=False)

    def matrix(self, n_outputs: int) -> NDArray[np.float64]:
        """``Sᵀ / √O`` for ``O = n_outputs``: shape ``(O, m)``."""
        if n_outputs not in self._matrices:
            rng = np.random.default_rng([self.seed, self.block, n_outputs])
            signs = rng.integers(0, 2, size=(n_outputs, self.projections)) * 2.0 - 1.0
            self._matrices[n_outputs] = np.asarray(signs / math.sqrt(n_outputs), np.float64)
        return self._matrices[n_outputs]

    def __call__(self, raw: Any) -> Any:
        from cvcore.outputs import select_output

        chosen = select_output(raw, self.base, is_leaf=_is_array, noun="array")
        flat = chosen.reshape(chosen.shape[0], -1)
        return flat @ as_array(self.matrix(int(flat.shape[1])), flat, self.backend)


@dataclass(frozen=True)
class SketchStatistics:
    """The sketched traced kernel and its errors.

    Attributes:
        kernel: ``K̂``, the mean of the per-projection kernels (N × N).
        entry_stderr: the standard error of each entry of ``K̂`` (N × N).
        relative_error: ``‖entry_stderr‖_F / ‖K̂‖_F``, the kernel's relative standard error.
        trace: ``Tr K̂``.
        trace_stderr: its standard error over projections.
        entropy: the entropy of ``K̂`` (natural log; see :mod:`cvcore.spectrum`).
        entropy_stderr: its jackknife standard error over projections.
        projections: ``m``.
    """

    kernel: NDArray[np.float64] = field(repr=False)
    entry_stderr: NDArray[np.float64] = field(repr=False)
    relative_error: float
    trace: float
    trace_stderr: float
    entropy: float
    entropy_stderr: float
    projections: int


def per_projection_kernels(full: NDArray[Any], projections: int) -> NDArray[np.float64]:
    """The ``m`` kernels ``K_k`` (shape ``(m, N, N)``) inside the full kernel of the
    ``m`` projected outputs (row ``i·m + k``)."""
    full = np.asarray(full, dtype=np.float64)
    dim = full.shape[0]
    if full.ndim != 2 or full.shape[1] != dim or dim % projections:
        raise InputError(f"expected a square kernel with a multiple of {projections} rows, "
                         f"got {describe(full)}")
    n = dim // projections
    k4 = full.reshape(n, projections, n, projections)
    return np.ascontiguousarray(np.einsum("ikjk->kij", k4))


def sketch_statistics(kernels: NDArray[Any]) -> SketchStatistics:
    """Mean and standard errors of independent per-projection kernels ``(m, N, N)``.

    The entry and trace errors are the standard errors of a mean of ``m`` independent
    terms; the entropy's is the jackknife's (leave one projection out).

    >>> k = np.stack([np.eye(2) * 2.0, np.eye(2) * 4.0])
    >>> s = sketch_statistics(k)
    >>> float(s.trace), float(s.trace_stderr), round(s.entropy, 6)
    (6.0, 2.0, 0.693147)
    """
    from cvcore.spectrum import collective_variables

    ks = np.asarray(kernels, dtype=np.float64)
    if ks.ndim != 3 or ks.shape[1] != ks.shape[2]:
        raise InputError(f"expected per-projection kernels of shape (m, N, N), got {describe(ks)}")
    m = ks.shape[0]
    if m < 2:
        raise InputError(f"expected at least 2 projections for an error estimate, got {m}")
    mean = ks.mean(axis=0)
    mean = (mean + mean.T) / 2
    entry = ks.std(axis=0, ddof=1) / math.sqrt(m)
    norm = float(np.linalg.norm(mean))
    traces = np.trace(ks, axis1=1, axis2=2)
    total = ks.sum(axis=0)
    loo = []
    for k in range(m):
        rest = (total - ks[k]) / (m - 1)
        loo.append(collective_variables((rest + rest.T) / 2).entropy)
    jack = np.asarray(loo)
    entropy_stderr = math.sqrt((m - 1) / m * float(((jack - jack.mean()) ** 2).sum()))
    return SketchStatistics(
        kernel=mean, entry_stderr=entry,
        relative_error=float(np.linalg.norm(entry)) / norm if norm > 0 else 0.0,
        trace=float(np.trace(mean)), trace_stderr=float(traces.std(ddof=1) / math.sqrt(m)),
        entropy=float(collective_variables(mean).entropy), entropy_stderr=entropy_stderr,
        projections=m)


def projections_for(relative_error: float, pilot: int, target: float) -> int:
    """How many projections reach ``target``, given a pilot of ``pilot`` projections with
    ``relative_error``: the error falls as ``1/√m``.

    >>> projections_for(0.2, 8, 0.1)
    32
    """
    if not 0 < target < 1:
        raise InputError(f"expected a target relative error between 0 and 1, got {target!r}")
    return max(pilot, math.ceil(pilot * (relative_error / target) ** 2))


@dataclass(frozen=True)
class SketchedKernel:
    """What :func:`sketched_kernel` returns: the statistics and where they came from."""

    statistics: SketchStatistics
    n_outputs: int
    n_params: int
    backend: str
    output: str | None

    def variables(self) -> SketchedVariables:
        """The collective variables of ``K̂`` with the sketch's standard errors."""
        from cvcore.spectrum import collective_variables

        return SketchedVariables(collective_variables(self.statistics.kernel), self.statistics)


@dataclass(frozen=True)
class SketchedVariables:
    """Collective variables of a sketched kernel, with standard errors over projections."""

    exact: Any
    statistics: SketchStatistics

    def to_dict(self) -> dict[str, Any]:
        """The variables of ``K̂`` plus ``method="sketched"``, ``trace_stderr``,
        ``entropy_stderr``, ``projections`` and ``kernel_stderr`` (relative, Frobenius)."""
        out: dict[str, Any] = self.exact.to_dict()
        st = self.statistics
        out.update(method="sketched", trace_stderr=st.trace_stderr,
                   entropy_stderr=st.entropy_stderr, projections=st.projections,
                   kernel_stderr=st.relative_error)
        return out


def _measure_block(model: Any, inputs: Any, request: KernelRequest, backend: Any,
                   projection: Projection) -> tuple[NDArray[np.float64], Any]:
    req = replace(request, kernel="full", output=projection)
    result = backend.ntk(model, inputs, req)
    return per_projection_kernels(result.kernel, projection.projections), result


def sketched_kernel(model: Any, inputs: Any, *, projections: int | None = None,
                    target_error: float | None = None, seed: int = 0,
                    backend: str | None = None, request: KernelRequest | None = None,
                    progress: Callable[[str], None] | None = None) -> SketchedKernel:
    """The sketched traced kernel of ``model`` on ``inputs`` (see the module's text).

    Args:
        projections: ``m``; with ``target_error`` too, the pilot's size.
        target_error: the kernel's relative standard error to reach: a pilot of
            ``projections`` (default 8) projections, then as many more as
            :func:`projections_for` says (at most ``MAX_PROJECTIONS``).
        seed: the seed of the projections (the same seed gives the same estimate).
        backend: a backend name; by default from the model.
        request: kernel options (``kernel`` is ignored: the result is traced).
        progress: called with a line of text per block of projections.
    """
    settings = Sketch(projections, target_error, seed)
    _check_sketch(settings)
    with warnings.catch_warnings():  # the adapter's advice to sketch is followed here
        warnings.filterwarnings("ignore", message="cvcore: .* backward passes")
        r, _ = bind(model, inputs, request or make_request(), backend)
    return sketch_resolved(r, settings, progress)


def _check_sketch(settings: Sketch) -> int:
    if settings.projections is None and settings.target_error is None:
        raise InputError("expected projections= or target_error= for a sketched kernel, got neither")
    m = PILOT_PROJECTIONS if settings.projections is None else settings.projections
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise InputError(f"expected projections to be an integer of at least 2, got {m!r}")
    return m


def sketch_resolved(r: Resolved, settings: Sketch,
                    progress: Callable[[str], None] | None = None) -> SketchedKernel:
    """:func:`sketched_kernel` for a call already resolved (:func:`cvcore.plan.bind`)."""
    m = _check_sketch(settings)
    model, inputs, req, chosen = r.model, r.inputs, r.request, r.backend
    seed, target_error = settings.seed, settings.target_error
    check_call(inputs, replace(req, kernel="traced"), "ntk")  # the result is N × N
    first = Projection(req.output, m, seed, 0, chosen)
    kernels, result = _measure_block(model, inputs, req, chosen, first)
    n_outputs = next(iter(first._matrices), 0)
    if progress:
        progress(f"sketch: {m} projections of {n_outputs} outputs")
    stats = sketch_statistics(kernels)
    if target_error is not None:
        wanted = min(projections_for(stats.relative_error, m, target_error), MAX_PROJECTIONS)
        block = 1
        while kernels.shape[0] < wanted:
            more = wanted - kernels.shape[0]
            if progress:
                progress(f"sketch: relative error {stats.relative_error:.3g} with "
                         f"{kernels.shape[0]} projections; {more} more for {target_error:g}")
            extra, _ = _measure_block(model, inputs, req, chosen,
                                      Projection(req.output, max(more, 2), seed, block, chosen))
            kernels = np.concatenate([kernels, extra])
            block += 1
        stats = sketch_statistics(kernels)
    return SketchedKernel(statistics=stats, n_outputs=n_outputs, n_params=result.n_params,
                          backend=chosen.name, output=describe_output(model, req.output))
