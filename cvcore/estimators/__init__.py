"""Stochastic estimators of the collective variables, on NumPy only.

Everything here works on a matrix-free operator ``matvec(V) -> K @ V`` (``V`` of shape
``(D, k)``, several vectors at once) or a :class:`cvcore.protocols.KernelOperator`; a
backend supplies the operator (its ``operator`` method) and never computes a variable.
Nothing here imports a framework or :mod:`cvcore.api`; :func:`cvcore.estimate.estimate`
decides between these and the exact spectrum.

* :mod:`~cvcore.estimators.common`: probes, checked products, the control variate, the
  ratio jackknife and the t factor of the error bars.
* :mod:`~cvcore.estimators.trace`: :func:`hutchinson_trace`, ``E[zᵀKz] = Tr K``.
* :mod:`~cvcore.estimators.lanczos`: :func:`slq_entropy`, stochastic Lanczos quadrature of
  ``Tr f(K)`` with ``f(λ) = -(λ/T) ln(λ/T)``, optionally deflated by the top eigenpairs.
* :mod:`~cvcore.estimators.topk`: :func:`randomized_topk`, the Halko-Martinsson-Tropp
  randomized range finder with power iterations and a Rayleigh-Ritz step.
* :mod:`~cvcore.estimators.alignment`: the trace, target and residual alignment from
  vector-Jacobian products only (a backend's ``probes``), for kernels too large to form.
* :mod:`~cvcore.estimators.variables`: :class:`EstimatedVariables` from an operator
  (:func:`stochastic_variables`) or an exact spectrum (:func:`exact_variables`).

Each returns an error estimate: the standard error over probes (trace and entropy) or
the residual norm ``‖K q - λ q‖`` of each Ritz pair (a symmetric ``K`` has an eigenvalue
within that distance of ``λ``). See ``docs/estimators.md``.
"""

from __future__ import annotations

from cvcore.estimators.alignment import (
    DEFAULT_ALIGNMENT_PROBES,
    AlignmentEstimates,
    probe_alignments,
)
from cvcore.estimators.common import DEFAULT_PROBES, Estimate, Seed, t_factor
from cvcore.estimators.lanczos import (
    BREAKDOWN_TOL,
    DEFAULT_STEPS,
    REORTH_BYTES,
    SLQEstimate,
    slq_entropy,
)
from cvcore.estimators.topk import (
    DEFAULT_OVERSAMPLE,
    DEFAULT_POWER_ITERS,
    DEFAULT_TOP_K,
    TopK,
    randomized_topk,
)
from cvcore.estimators.trace import hutchinson_trace
from cvcore.estimators.variables import (
    EstimatedVariables,
    exact_variables,
    stochastic_variables,
)

__all__ = [
    "BREAKDOWN_TOL",
    "DEFAULT_ALIGNMENT_PROBES",
    "DEFAULT_OVERSAMPLE",
    "DEFAULT_POWER_ITERS",
    "DEFAULT_PROBES",
    "DEFAULT_STEPS",
    "DEFAULT_TOP_K",
    "REORTH_BYTES",
    "AlignmentEstimates",
    "Estimate",
    "EstimatedVariables",
    "SLQEstimate",
    "Seed",
    "TopK",
    "exact_variables",
    "hutchinson_trace",
    "probe_alignments",
    "randomized_topk",
    "slq_entropy",
    "stochastic_variables",
    "t_factor",
]
