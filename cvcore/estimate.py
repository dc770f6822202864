"""Trace, entropy and top eigenvalues with error bars: exact when the kernel fits,
stochastic otherwise.

:func:`estimate_resolved` is the one orchestration, for a call resolved once
(:func:`cvcore.plan.bind`): it runs the front checks
(:func:`cvcore.validate.check_call`), and either forms and diagonalizes the kernel or hands
the backend's matrix-free :class:`KernelOperator` to the NumPy estimators of
:mod:`cvcore.estimators` (:func:`choose_method` decides under ``method="auto"``).
:func:`estimate` is the same with keyword options. The estimators' names
(:func:`hutchinson_trace`, :func:`slq_entropy`, :func:`randomized_topk`, ...) are
importable from here as well. See ``docs/estimators.md``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cvcore.errors import BackendError, InputError
from cvcore.estimators import (
    BREAKDOWN_TOL,
    DEFAULT_OVERSAMPLE,
    DEFAULT_POWER_ITERS,
    DEFAULT_PROBES,
    DEFAULT_STEPS,
    DEFAULT_TOP_K,
    REORTH_BYTES,
    Estimate,
    EstimatedVariables,
    Seed,
    SLQEstimate,
    TopK,
    exact_variables,
    hutchinson_trace,
    randomized_topk,
    slq_entropy,
    stochastic_variables,
    t_factor,
)
from cvcore.plan import Resolved, bind, build_kernel
from cvcore.protocols import (
    DiagonalBackend,
    KernelOperator,
    KernelRequest,
    MatVec,
    OperatorBackend,
)
from cvcore.request import METHODS, TRACE_ESTIMATORS, EstimatorOptions, Options
from cvcore.spectrum import collective_variables
from cvcore.validate import check_call, make_request

#: Largest traced kernel (``D = N``) that ``method="auto"`` measures exactly: near the
#: measured crossover, where the stochastic estimate starts to cost less CPU time
#: (docs/estimators.md, "The crossover").
DEFAULT_MAX_EXACT_DIM = 5000
#: The same for the full kernel (``D = N·O``), whose matrix-free products are ``O`` times
#: cheaper per ``D`` than the traced kernel's, so the estimate wins earlier.
DEFAULT_MAX_EXACT_DIM_FULL = 2000
#: Fraction of the available memory the exact path's kernel and eigensolver may take.
EXACT_MEMORY_FRACTION = 0.5


def choose_method(dim: int, available_bytes: int | None = None, *,
                  max_exact_dim: int | None = None, kernel: str = "traced") -> str:
    """``"exact"`` when a ``D × D`` float64 kernel is cheaper to diagonalize than to
    estimate and fits in memory, else ``"stochastic"``.

    Exact needs ``D ≤ max_exact_dim`` (by default :data:`DEFAULT_MAX_EXACT_DIM` for the
    traced kernel and :data:`DEFAULT_MAX_EXACT_DIM_FULL` for the full one, the measured
    crossovers) and ``3 · 8 · D²`` bytes (kernel, float64 copy, solver workspace) within
    ``EXACT_MEMORY_FRACTION`` of ``available_bytes`` (by default the memory available
    now; unknown counts as enough).

    >>> choose_method(1000, 1 << 30), choose_method(30000, 1 << 40), choose_method(8000, 1 << 30)
    ('exact', 'stochastic', 'stochastic')
    >>> choose_method(3000, 1 << 40), choose_method(3000, 1 << 40, kernel="full")
    ('exact', 'stochastic')
    """
    from cvcore.memory import available_memory, kernel_bytes

    if max_exact_dim is None:
        max_exact_dim = DEFAULT_MAX_EXACT_DIM_FULL if kernel == "full" else DEFAULT_MAX_EXACT_DIM
    if dim > max_exact_dim:
        return "stochastic"
    free = available_memory() if available_bytes is None else available_bytes
    if free is not None and kernel_bytes(dim, 1, "traced", 8) > EXACT_MEMORY_FRACTION * free:
        return "stochastic"
    return "exact"


def _request(options: dict[str, Any]) -> KernelRequest:
    """Keyword kernel options (:class:`cvcore.request.Options`' fields but ``backend``)
    as a request."""
    known = list(Options().kernel_options())
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise InputError(f"expected options among {known}, got {unknown}")
    return make_request(**options)


def _exact(r: Resolved, top_k: int) -> EstimatedVariables:
    return exact_variables(collective_variables(build_kernel(r)[0].kernel), top_k)


def _exact_trace(r: Resolved, dim: int, trace_estimator: str) -> float | None:
    """``Tr K`` from the backend's ``diagonal`` (no kernel formed), or ``None``."""
    chosen = r.backend
    has_diagonal = isinstance(chosen, DiagonalBackend)
    if trace_estimator == "hutchinson" or (trace_estimator == "auto" and not has_diagonal):
        return None
    if not has_diagonal:
        raise BackendError(f"expected a backend with a 'diagonal' method for "
                           f"trace_estimator='diagonal', got backend {chosen.name!r} without one")
    diag = np.asarray(chosen.diagonal(r.model, r.inputs, r.request), dtype=np.float64).reshape(-1)
    if diag.size != dim:
        raise BackendError(f"backend {chosen.name!r} returned a diagonal of {diag.size} entries, "
                           f"expected {dim}")
    return float(diag.sum())


def estimate_request(model: Any, inputs: Any, request: KernelRequest,
                     options: EstimatorOptions | None = None, *,
                     backend: str | None = None) -> EstimatedVariables:
    """:func:`estimate` for a validated request and estimator settings, as they are made
    once in front (by :func:`cvcore.validate.make_request` and :class:`EstimatorOptions`):
    the call is resolved once (:func:`cvcore.plan.bind`), then :func:`estimate_resolved`."""
    r, _ = bind(model, inputs, request, backend)
    return estimate_resolved(r, EstimatorOptions() if options is None else options)


def estimate_resolved(r: Resolved, opts: EstimatorOptions) -> EstimatedVariables:
    """The estimate for a call already resolved: ``method="auto"`` measures exactly when
    the backend has no ``operator`` or when :func:`choose_method` says the kernel fits.

    Raises:
        BackendError: ``method="stochastic"`` with a backend that has no ``operator``, or
            ``trace_estimator="diagonal"`` with one that has no ``diagonal``.
    """
    chosen = r.backend
    if opts.method == "exact" or (opts.method == "auto" and not isinstance(chosen, OperatorBackend)):
        return _exact(r, opts.top_k)
    if not isinstance(chosen, OperatorBackend):
        raise BackendError(f"expected a backend with an 'operator' method for "
                           f"method='stochastic', got backend {r.backend.name!r} without one; "
                           "use method='exact'")
    check_call(r.inputs, r.request, "operator")
    op = chosen.operator(r.model, r.inputs, r.request)
    if opts.method == "auto" and choose_method(op.dim, opts.available_bytes,
                                               max_exact_dim=opts.max_exact_dim,
                                               kernel=r.request.kernel) == "exact":
        return _exact(r, opts.top_k)
    trace = _exact_trace(r, op.dim, opts.trace_estimator)
    return stochastic_variables(op, trace, probes=opts.probes, steps=opts.steps,
                                top_k=opts.top_k, oversample=opts.oversample,
                                power_iters=opts.power_iters, deflate=opts.deflate,
                                rng=np.random.default_rng(opts.seed))


def estimate(model: Any, inputs: Any, *, method: str = "auto", probes: int = DEFAULT_PROBES,
             steps: int = DEFAULT_STEPS, top_k: int = DEFAULT_TOP_K,
             oversample: int = DEFAULT_OVERSAMPLE, power_iters: int = DEFAULT_POWER_ITERS,
             trace_estimator: str = "auto", deflate: bool = True, seed: Seed = 0,
             backend: str | None = None,
             max_exact_dim: int | None = None, available_bytes: int | None = None,
             **options: Any) -> EstimatedVariables:
    """Trace, entropy and top eigenvalues of ``model``'s NTK on ``inputs``, with error bars.

    Args:
        model: a model of any registered backend's framework.
        inputs: the probe inputs, batch first.
        method: ``"exact"`` (form and diagonalize the kernel), ``"stochastic"``
            (matrix-free estimates; needs a backend with an ``operator`` method) or
            ``"auto"`` (:func:`choose_method` on the kernel's dimension).
        probes: Rademacher probes for the trace and the entropy.
        steps: Lanczos steps per probe.
        top_k: how many of the largest eigenvalues to report.
        oversample: extra columns of the randomized range finder.
        power_iters: power iterations of the randomized range finder.
        trace_estimator: ``"diagonal"`` (exact ``Tr K`` from the backend's ``diagonal``),
            ``"hutchinson"`` (from the probes), or ``"auto"`` (diagonal when available).
        deflate: count the ``top_k`` Ritz pairs exactly and probe only the rest (see
            :func:`slq_entropy`); much smaller errors on NTK spectra.
        seed: seed of the probes.
        backend: a registered backend's name; by default chosen from the model's type.
        max_exact_dim: largest ``D`` that ``"auto"`` measures exactly (by default the
            measured crossover of the kernel's convention, see :func:`choose_method`).
        available_bytes: memory ``"auto"`` may plan with; by default what is free now.
        **options: kernel options as for :func:`cvcore.ntk` (``kernel``, ``output``,
            ``dtype``, ``device``, ``train``, ``memory_budget``, ``implementation``).

    Raises:
        InputError: an option is invalid.
        BackendError: ``method="stochastic"`` with a backend that has no ``operator``.
    """
    settings = EstimatorOptions(method=method, probes=probes, steps=steps, top_k=top_k,
                                oversample=oversample, power_iters=power_iters,
                                trace_estimator=trace_estimator, deflate=deflate, seed=seed,
                                max_exact_dim=max_exact_dim, available_bytes=available_bytes)
    return estimate_request(model, inputs, _request(options), settings, backend=backend)


__all__ = [
    "BREAKDOWN_TOL",
    "DEFAULT_MAX_EXACT_DIM",
    "DEFAULT_MAX_EXACT_DIM_FULL",
    "DEFAULT_OVERSAMPLE",
    "DEFAULT_POWER_ITERS",
    "DEFAULT_PROBES",
    "DEFAULT_STEPS",
    "DEFAULT_TOP_K",
    "EXACT_MEMORY_FRACTION",
    "METHODS",
    "REORTH_BYTES",
    "TRACE_ESTIMATORS",
    "Estimate",
    "EstimatedVariables",
    "EstimatorOptions",
    "KernelOperator",
    "MatVec",
    "SLQEstimate",
    "Seed",
    "TopK",
    "choose_method",
    "estimate",
    "estimate_request",
    "estimate_resolved",
    "hutchinson_trace",
    "randomized_topk",
    "slq_entropy",
    "t_factor",
]
