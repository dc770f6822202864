"""Hutchinson's estimate of the trace from Rademacher probes, ``E[zᵀKz] = Tr K``."""

from __future__ import annotations

import numpy as np

from cvcore.estimators.common import (
    DEFAULT_PROBES,
    Estimate,
    Seed,
    apply,
    check_counts,
    coldot,
    rademacher,
    standard_error,
)
from cvcore.protocols import MatVec


def hutchinson_trace(matvec: MatVec, dim: int, probes: int = DEFAULT_PROBES,
                     rng: Seed = None) -> Estimate:
    """Hutchinson's estimate of ``Tr K`` with Rademacher probes.

    Args:
        matvec: ``K @ V`` for ``V`` of shape ``(dim, probes)``.
        dim: ``D``.
        probes: number of probe vectors (at least 2, for the error estimate).
        rng: seed or ``numpy.random.Generator``.

    Returns:
        The mean of ``zᵀ K z`` over probes and its standard error.

    >>> hutchinson_trace(lambda v: 3.0 * v, 5, probes=4, rng=0)
    Estimate(value=15.0, stderr=0.0)
    """
    check_counts(dim, probes=probes)
    z = rademacher(np.random.default_rng(rng), dim, probes)
    samples = coldot(z, apply(matvec, z))
    return Estimate(float(samples.mean()), standard_error(samples))


__all__ = ["hutchinson_trace"]
