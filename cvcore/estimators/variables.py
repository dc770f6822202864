"""Collective variables with error bars from a matrix-free operator, or from an exact
spectrum in the same form.

NumPy only: :func:`stochastic_variables` receives a :class:`cvcore.protocols.KernelOperator`
(what a backend's ``operator`` returns) and never sees the model or the framework.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore import progress
from cvcore.estimators.lanczos import slq_entropy
from cvcore.estimators.topk import TopK, randomized_topk
from cvcore.protocols import KernelOperator, MatVec
from cvcore.spectrum import CollectiveVariables


@dataclass(frozen=True)
class EstimatedVariables:
    """Collective variables with error bars, exact or stochastic.

    Attributes:
        trace: ``Tr K``.
        trace_stderr: its standard error (0 when exact or from the kernel's diagonal).
        normalized_trace: ``Tr K / D``.
        entropy: ``S = -Σ p ln p`` of ``p = λ / Tr K`` (natural log).
        entropy_stderr: its standard error (0 when exact).
        effective_rank: ``exp(entropy)``.
        top_eigenvalues: the largest eigenvalues, descending.
        top_residuals: ``‖K q - λ q‖`` per eigenpair (0 when exact); a true eigenvalue
            lies within this distance of each reported one.
        dim: ``D``.
        probes: probe vectors used (0 when exact).
        steps: Lanczos steps per probe, at most (0 when exact).
        method: ``"exact"`` or ``"stochastic"`` (the spectrum's; ``"none"`` when not asked).
        target_alignment: ``A(K, Y)``, centred (NaN when no targets were given).
        target_alignment_stderr: its standard error (0 when exact).
        residual_alignment: ``Σ_c r_cᵀ K r_c / (‖R‖_F² Tr K)`` (NaN without a residual).
        residual_alignment_stderr: its standard error (0 when exact).
        alignment_method: ``"exact"`` (from the formed kernel), ``"probes"`` (from
            vector-Jacobian products, :mod:`cvcore.estimators.alignment`) or ``""``.
    """

    trace: float
    trace_stderr: float
    normalized_trace: float
    entropy: float
    entropy_stderr: float
    effective_rank: float
    top_eigenvalues: NDArray[np.float64] = field(repr=False)
    top_residuals: NDArray[np.float64] = field(repr=False)
    dim: int
    probes: int
    steps: int
    method: str
    target_alignment: float = math.nan
    target_alignment_stderr: float = math.nan
    residual_alignment: float = math.nan
    residual_alignment_stderr: float = math.nan
    alignment_method: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (arrays as lists), ready for JSON."""
        out = asdict(self)
        out["top_eigenvalues"] = [float(v) for v in self.top_eigenvalues]
        out["top_residuals"] = [float(v) for v in self.top_residuals]
        return out


def exact_variables(cv: CollectiveVariables, top_k: int) -> EstimatedVariables:
    """An exact spectrum's variables as :class:`EstimatedVariables` (zero error bars)."""
    top = cv.eigenvalues[: min(top_k, cv.dim)].copy()
    return EstimatedVariables(
        trace=cv.trace, trace_stderr=0.0, normalized_trace=cv.normalized_trace,
        entropy=cv.entropy, entropy_stderr=0.0, effective_rank=cv.effective_rank,
        top_eigenvalues=top, top_residuals=np.zeros_like(top), dim=cv.dim, probes=0, steps=0,
        method="exact")


def stochastic_variables(op: KernelOperator, trace: float | None, *, probes: int, steps: int,
                         top_k: int, oversample: int, power_iters: int, deflate: bool,
                         rng: np.random.Generator) -> EstimatedVariables:
    """Trace, entropy and top eigenvalues of ``op``, with error bars.

    The top ``top_k`` Ritz pairs (:func:`randomized_topk`) come first; with ``deflate``
    they are counted exactly and the entropy's probes see only the rest
    (:func:`slq_entropy`). ``trace`` is the exact ``Tr K`` (from the kernel's diagonal)
    or ``None`` (Hutchinson's estimate from the same probes). One ``rng`` serves both, in
    that order, so a seed gives the same numbers.
    """
    k = min(top_k, op.dim)
    matvec = counted(op.matvec, (power_iters + 2 if k > 0 else 0) + min(steps, op.dim))
    top = (randomized_topk(matvec, op.dim, k, oversample, power_iters, rng) if k > 0
           else TopK(np.zeros(0), np.zeros(0)))
    slq = slq_entropy(matvec, op.dim, probes, steps, rng, trace=trace,
                      deflation=top if deflate and k > 0 else None)
    return EstimatedVariables(
        trace=slq.trace, trace_stderr=slq.trace_stderr, normalized_trace=slq.trace / op.dim,
        entropy=slq.entropy, entropy_stderr=slq.stderr, effective_rank=math.exp(slq.entropy),
        top_eigenvalues=top.eigenvalues, top_residuals=top.residuals, dim=op.dim,
        probes=slq.probes, steps=slq.steps, method="stochastic")


def counted(matvec: MatVec, total: int) -> MatVec:
    """``matvec`` that reports each batched product to :mod:`cvcore.progress`."""
    if not progress.active():
        return matvec
    done = 0

    def counting(v: NDArray[np.float64]) -> NDArray[np.float64]:
        nonlocal done
        out = matvec(v)
        done += 1
        progress.advance("estimator products", min(done, total), total)
        return out

    return counting


__all__ = ["EstimatedVariables", "counted", "exact_variables", "stochastic_variables"]
