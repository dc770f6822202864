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

import dataclasses
import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import BackendError, InputError
from cvcore.estimators import (
    BREAKDOWN_TOL,
    DEFAULT_ALIGNMENT_PROBES,
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
from cvcore.estimators.alignment import (
    AlignmentEstimates,
    Factor,
    cross_entropy_factor,
    dense_factor,
    labels_factor,
    probe_alignments,
)
from cvcore.plan import Resolved, bind, build_kernel
from cvcore.protocols import (
    DiagonalBackend,
    Implementation,
    JacobianProbes,
    KernelOperator,
    KernelRequest,
    MatVec,
    OperatorBackend,
    OutputSelector,
    ProbeBackend,
)
from cvcore.request import METHODS, TRACE_ESTIMATORS, EstimatorOptions

#: Residuals by name: computed from the outputs ``f`` (and the targets ``Y``).
RESIDUALS = ("cross_entropy", "mse", "ones")
#: Vectors per Gram block of the Frobenius norm when output signs are drawn (traced kernel,
#: ``O > 1``): each block shares one pair of sign vectors, so the blocks are the
#: independent units of its standard error.
SIGN_BLOCK = 4
#: What ``estimate`` takes besides the kernel options and :class:`EstimatorOptions`: the data
#: the alignments need.
ESTIMATE_ONLY = ("targets", "residual")
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
                     backend: str | None = None, targets: Any = None,
                     residual: Any = None) -> EstimatedVariables:
    """:func:`estimate` for a validated request and estimator settings, as they are made
    once in front (by :func:`cvcore.validate.make_request` and :class:`EstimatorOptions`):
    the call is resolved once (:func:`cvcore.plan.bind`), then :func:`estimate_resolved`."""
    r, _ = bind(model, inputs, request, backend)
    return estimate_resolved(r, EstimatorOptions() if options is None else options,
                             targets=targets, residual=residual)


def _spectrum(r: Resolved, opts: EstimatorOptions) -> EstimatedVariables:
    """Trace, entropy and top eigenvalues: exact, or from the backend's operator."""
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


def estimate_resolved(r: Resolved, opts: EstimatorOptions, *, targets: Any = None,
                      residual: Any = None) -> EstimatedVariables:
    """The estimate for a call already resolved.

    Without ``targets`` and ``residual``: ``method="auto"`` measures exactly when the
    backend has no ``operator`` or when :func:`choose_method` says the kernel fits. With
    them, the alignments too (:func:`alignment_method` decides exact or probes).

    Raises:
        BackendError: ``method="stochastic"`` with a backend that has no ``operator``, or
            ``trace_estimator="diagonal"`` with one that has no ``diagonal``.
    """
    if targets is None and residual is None:
        if opts.sample_axes != 1:
            raise InputError("expected targets or a residual with sample_axes=2 (only the "
                             "trace and the alignments are estimated per position), got neither")
        return _spectrum(r, opts)
    return _with_alignments(r, opts, targets, residual)


def alignment_cost(n_outputs: int, probes: int, targets: bool, residual: bool,
                   traced: bool = True) -> tuple[int, int]:
    """Backward passes over the probe batch: ``(exact, probes)``. The exact kernel costs
    one per output (the structured path's batched backward per output; ``O`` for
    ``traced``, and as many for ``full``); the probes one per product: ``probes`` for the
    trace, ``probes`` (+ ``2·probes`` for ``‖HKH‖_F`` when ``O > 1``, ``probes`` else)
    for the targets, ``probes`` for the residual."""
    fro = 2 * probes if traced and n_outputs > 1 else probes
    return n_outputs, probes + (probes + fro if targets else 0) + (probes if residual else 0)


def alignment_method(opts: EstimatorOptions, dim: int, n_outputs: int, targets: bool,
                     residual: bool, kernel: str = "traced") -> str:
    """``"exact"`` or ``"probes"`` for the alignments: ``exact`` when asked; under
    ``"auto"`` when the samples are the batch's rows (``sample_axes=1``), the kernel fits
    (:func:`choose_method`) and forming it costs no more backward passes than the probes
    (:func:`alignment_cost`)."""
    if opts.method == "exact":
        return "exact"
    if opts.method == "stochastic" or opts.sample_axes != 1:
        return "probes"
    exact, probed = alignment_cost(n_outputs, opts.alignment_probes, targets, residual,
                                   kernel == "traced")
    fits = choose_method(dim, opts.available_bytes, max_exact_dim=opts.max_exact_dim,
                         kernel=kernel) == "exact"
    return "exact" if fits and exact <= probed else "probes"


def _labels(targets: Any) -> NDArray[np.int64] | None:
    t = np.asarray(targets)
    return t.reshape(-1).astype(np.int64) if t.ndim == 1 and t.dtype.kind in "iu" else None


def _dense_residual(name: Any, outputs: NDArray[Any] | None, targets: Any) -> NDArray[np.float64]:
    """The residual ``(N, C)`` as an array: given, or by name from outputs and targets."""
    if not isinstance(name, str):
        arr = np.asarray(name, dtype=np.float64)
        return arr.reshape(-1, 1) if arr.ndim == 1 else arr
    assert outputs is not None
    f = outputs.astype(np.float64)
    if name == "ones":
        return np.ones((f.shape[0], 1))
    labels = _labels(targets)
    if name == "cross_entropy":
        if labels is None:
            raise InputError("expected integer class labels as targets for "
                             "residual='cross_entropy', got none or real targets")
        p = np.exp(f - f.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(f.shape[0]), labels] -= 1.0
        probs: NDArray[np.float64] = p
        return probs
    y = np.eye(f.shape[1])[labels] if labels is not None else np.asarray(targets, np.float64)
    out: NDArray[np.float64] = f - y.reshape(f.shape)
    return out


def _check_rows(values: Any, n_rows: int | None, what: str) -> None:
    """One row of ``values`` (targets or a residual array) per sample of the kernel."""
    if values is None or isinstance(values, str) or n_rows is None:
        return
    got = int(np.shape(values)[0]) if np.ndim(values) else 0
    if got != n_rows:
        raise InputError(f"expected {what} for the kernel's {n_rows} samples, got {got} rows")


def _check_names(targets: Any, residual: Any) -> None:
    if isinstance(targets, str) and targets != "outputs":
        raise InputError(f"expected targets as labels, an array or 'outputs', got {targets!r}")
    if isinstance(residual, str) and residual not in RESIDUALS:
        raise InputError(f"expected residual among {list(RESIDUALS)} or an array, got "
                         f"{residual!r}")


def _with_alignments(r: Resolved, opts: EstimatorOptions, targets: Any,
                     residual: Any) -> EstimatedVariables:
    _check_names(targets, residual)
    chosen = r.backend
    probes: JacobianProbes | None = None
    if isinstance(chosen, ProbeBackend):
        check_call(r.inputs, r.request, "operator")
        probes = chosen.probes(r.model, r.inputs, r.request, opts.sample_axes)
    needs_outputs = isinstance(targets, str) or isinstance(residual, str)
    if probes is None and (opts.method == "stochastic" or needs_outputs):
        raise BackendError(f"expected a backend with a 'probes' method for "
                           f"{'the outputs' if needs_outputs else 'method=stochastic'}, got "
                           f"backend {chosen.name!r} without one")
    traced = r.request.kernel == "traced"
    if probes is not None:
        n, o = probes.n_samples, probes.n_outputs
    else:
        n, o = -1, 1
    outputs = probes.outputs() if probes is not None and needs_outputs else None
    if isinstance(targets, str):
        assert outputs is not None
        targets = outputs.astype(np.float64)
    dim = n * (1 if traced else o)
    how = ("exact" if probes is None else
           alignment_method(opts, dim, o, targets is not None, residual is not None,
                            r.request.kernel))
    if how == "exact":
        if opts.sample_axes != 1:
            raise InputError("expected method='stochastic' or 'auto' with sample_axes=2, got "
                             "method='exact'")
        from cvcore.dynamics.alignment import residual_alignment, target_alignment

        formed = probes.kernel() if probes is not None and probes.kernel is not None else None
        n_rows = probes.n_samples if formed is not None and probes is not None else None
        probes = None  # its graph is freed before the kernel is formed another way
        if formed is None:
            built = build_kernel(r)[0]
            kernel, n_rows = built.kernel, built.n_samples
        else:
            kernel = formed
        _check_rows(targets, n_rows, "targets")
        _check_rows(residual, n_rows, "residual")
        base = exact_variables(collective_variables(kernel), opts.top_k)
        kind = "traced" if traced else "full"
        ta = (target_alignment(kernel, targets, layout=kind) if targets is not None
              else math.nan)
        ra = (residual_alignment(kernel, _dense_residual(residual, outputs, targets), 1,
                                 layout=kind).quadratic if residual is not None else math.nan)
        return dataclasses.replace(base, target_alignment=ta, target_alignment_stderr=0.0,
                                   residual_alignment=ra, residual_alignment_stderr=0.0,
                                   alignment_method="exact")
    assert probes is not None
    est = _probe_estimates(probes, opts, targets, residual, outputs, traced)
    if opts.spectrum and opts.sample_axes == 1 and isinstance(chosen, OperatorBackend):
        base = _spectrum(r, dataclasses.replace(opts, method="stochastic"))
    else:
        nothing = np.zeros(0)
        base = EstimatedVariables(
            trace=est.trace.value, trace_stderr=est.trace.stderr,
            normalized_trace=est.trace.value / dim, entropy=math.nan, entropy_stderr=math.nan,
            effective_rank=math.nan, top_eigenvalues=nothing, top_residuals=nothing, dim=dim,
            probes=0, steps=0, method="none")
    nan = (math.nan, math.nan)
    ta_v, ta_s = est.target_alignment if est.target_alignment is not None else nan
    ra_v, ra_s = est.residual_alignment if est.residual_alignment is not None else nan
    return dataclasses.replace(base, target_alignment=ta_v, target_alignment_stderr=ta_s,
                               residual_alignment=ra_v, residual_alignment_stderr=ra_s,
                               alignment_method="probes")


def _probe_estimates(probes: JacobianProbes, opts: EstimatorOptions, targets: Any,
                     residual: Any, outputs: NDArray[Any] | None,
                     traced: bool) -> AlignmentEstimates:
    """The trace and the alignments from the backend's vector-Jacobian products."""
    n, o = probes.n_samples, probes.n_outputs
    tfac: Factor | None = None
    if targets is not None:
        labels = _labels(targets)
        if labels is not None and traced:
            tfac = labels_factor(labels)
        else:
            y = np.eye(o)[labels] if labels is not None else np.asarray(targets, np.float64)
            tfac = dense_factor(y, centred=True)
        if tfac.n_rows != n:
            raise InputError(f"expected targets for {n} samples, got {tfac.n_rows}")
    rfac: Factor | None = None
    if residual is not None:
        labels = _labels(targets) if targets is not None else None
        if residual == "cross_entropy" and outputs is not None and labels is not None:
            rfac = cross_entropy_factor(outputs, labels)
        else:
            rfac = dense_factor(_dense_residual(residual, outputs, targets), centred=False)
    from cvcore.memory import available_memory

    free = available_memory() if opts.available_bytes is None else opts.available_bytes
    budget = int(2 ** 30 if free is None else free) // 4
    per_vector = max(1, (probes.n_params or 1) * 8)
    cap = budget // per_vector  # parameter-sized products a Gram block may hold
    # output signs are shared within a block: small blocks, many of them, when drawn
    signs = traced and o > 1
    block = int(max(2, min(SIGN_BLOCK if signs else opts.alignment_probes, cap,
                           opts.alignment_probes // 2 if signs else opts.alignment_probes)))
    return probe_alignments(probes, targets=tfac, residual=rfac, n_probes=opts.alignment_probes,
                            block=block, traced=traced, rng=opts.seed)


def estimate(model: Any, inputs: Any, *, kernel: str = "traced",
             output: OutputSelector | None = None, dtype: str | None = None,
             device: str | None = None, train: bool = False,
             memory_budget: str | int | None = None,
             implementation: str | Implementation = Implementation.AUTO,
             family: str | None = None, verify: bool = False, backend: str | None = None,
             method: str = "auto", probes: int = DEFAULT_PROBES,
             steps: int = DEFAULT_STEPS, top_k: int = DEFAULT_TOP_K,
             oversample: int = DEFAULT_OVERSAMPLE, power_iters: int = DEFAULT_POWER_ITERS,
             trace_estimator: str = "auto", deflate: bool = True, seed: Seed = 0,
             max_exact_dim: int | None = None, available_bytes: int | None = None,
             alignment_probes: int = DEFAULT_ALIGNMENT_PROBES, sample_axes: int = 1,
             spectrum: bool = True, targets: Any = None,
             residual: Any = None) -> EstimatedVariables:
    """Trace, entropy and top eigenvalues of ``model``'s NTK on ``inputs``, with error bars;
    with ``targets`` / ``residual``, the target and residual alignment too.

    Args:
        model: a model of any registered backend's framework.
        inputs: the probe inputs, batch first.
        kernel, output, dtype, device, train, memory_budget, implementation, family,
            verify, backend: the kernel options, as for :func:`cvcore.ntk`
            (:class:`cvcore.request.Options`).
        method: ``"exact"`` (form and diagonalize the kernel), ``"stochastic"``
            (matrix-free estimates; needs a backend with an ``operator`` method, and for
            the alignments one with ``probes``) or ``"auto"`` (:func:`choose_method` on the
            kernel's dimension; for the alignments :func:`alignment_method`, by cost).
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
        max_exact_dim: largest ``D`` that ``"auto"`` measures exactly (by default the
            measured crossover of the kernel's convention, see :func:`choose_method`).
        available_bytes: memory ``"auto"`` may plan with; by default what is free now.
        alignment_probes: products per estimated inner product, and vectors for
            ``‖HKH‖_F`` (:func:`cvcore.estimators.alignment.probe_alignments`).
        sample_axes: ``2``: the output is ``(B, S, O)`` and each of its ``B·S`` rows is a
            sample (a language model's positions); trace and alignments only.
        spectrum: also estimate entropy and top eigenvalues on the probes path (``False``:
            NaN, and only the trace and the alignments are computed).
        targets: integer labels ``(N,)`` (one-hot), real targets ``(N, C)``, or
            ``"outputs"`` (the outputs themselves, e.g. per-sample losses): the centred
            target alignment ``A(K, Y)``.
        residual: ``(N, C)`` values, or ``"cross_entropy"`` (``softmax(f) − onehot(y)``),
            ``"mse"`` (``f − Y``), ``"ones"`` (``∂L/∂ℓ`` of a mean of per-sample losses):
            ``Σ_c r_cᵀ K r_c / (‖R‖_F² Tr K)``.

    Raises:
        InputError: an option is invalid.
        BackendError: ``method="stochastic"`` with a backend that has no ``operator``.
    """
    settings = EstimatorOptions(method=method, probes=probes, steps=steps, top_k=top_k,
                                oversample=oversample, power_iters=power_iters,
                                trace_estimator=trace_estimator, deflate=deflate, seed=seed,
                                max_exact_dim=max_exact_dim, available_bytes=available_bytes,
                                alignment_probes=alignment_probes, sample_axes=sample_axes,
                                spectrum=spectrum)
    request = make_request(kernel=kernel, output=output, dtype=dtype, device=device,
                           train=train, memory_budget=memory_budget,
                           implementation=implementation, family=family, verify=verify)
    return estimate_request(model, inputs, request, settings, backend=backend,
                            targets=targets, residual=residual)


__all__ = [
    "BREAKDOWN_TOL",
    "DEFAULT_ALIGNMENT_PROBES",
    "DEFAULT_MAX_EXACT_DIM",
    "DEFAULT_MAX_EXACT_DIM_FULL",
    "DEFAULT_OVERSAMPLE",
    "DEFAULT_POWER_ITERS",
    "DEFAULT_PROBES",
    "DEFAULT_STEPS",
    "DEFAULT_TOP_K",
    "ESTIMATE_ONLY",
    "EXACT_MEMORY_FRACTION",
    "METHODS",
    "REORTH_BYTES",
    "RESIDUALS",
    "TRACE_ESTIMATORS",
    "Estimate",
    "EstimatedVariables",
    "EstimatorOptions",
    "KernelOperator",
    "MatVec",
    "SLQEstimate",
    "Seed",
    "TopK",
    "alignment_cost",
    "alignment_method",
    "choose_method",
    "estimate",
    "estimate_request",
    "estimate_resolved",
    "hutchinson_trace",
    "randomized_topk",
    "slq_entropy",
    "t_factor",
]
