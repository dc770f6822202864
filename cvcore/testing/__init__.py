"""The conformance kit for cvcore backends, to run from a backend's own tests.

* :mod:`cvcore.testing.conformance`: :func:`run_backend_conformance` and its report;
* :mod:`cvcore.testing.checks`: the checks it runs, one function each;
* :mod:`cvcore.testing.reference`: the references it compares against (a finite-difference
  Jacobian in float64, the kernels it gives, the relative error).

Everything is importable from ``cvcore.testing``. The package imports only NumPy and
cvcore, never a framework.
"""

from __future__ import annotations

from cvcore.testing.checks import FOREIGN, TINY_BUDGETS, ConformanceFailure
from cvcore.testing.conformance import CHECKS, ConformanceReport, run_backend_conformance
from cvcore.testing.reference import (
    FiniteDifferenceAccess,
    finite_difference_jacobian,
    kernel_from_jacobian,
    relative_error,
    traced_from_full,
)

__all__ = [
    "CHECKS",
    "FOREIGN",
    "TINY_BUDGETS",
    "ConformanceFailure",
    "ConformanceReport",
    "FiniteDifferenceAccess",
    "finite_difference_jacobian",
    "kernel_from_jacobian",
    "relative_error",
    "run_backend_conformance",
    "traced_from_full",
]

