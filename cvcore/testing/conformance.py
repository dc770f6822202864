"""A conformance suite for cvcore backends, to run from a backend's own tests.

:func:`run_backend_conformance` checks that a :class:`cvcore.protocols.Backend` keeps the
contract every part of cvcore relies on: its attributes, model selection, both kernel
conventions (``traced`` N × N, ``full`` N·O × N·O with row ``i·O + o``), symmetry and
positive semi-definiteness, blocking and implementation invariance, float32 / float64
handling, odd batch sizes, errors that are :class:`cvcore.errors.CVCoreError` subclasses,
and agreement with a Jacobian built by central finite differences in float64 (the one
reference that needs nothing from the backend under test).

The module imports only NumPy and cvcore, never a framework: a backend's test imports its
own framework and hands the suite factories for a model and its inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cvcore.errors import InputError
from cvcore.testing.checks import _CHECK_FUNCTIONS, _Run
from cvcore.testing.reference import FiniteDifferenceAccess

#: Every check, in the order the suite runs them.
CHECKS = (
    "attributes",
    "available",
    "accepts",
    "registry",
    "shapes",
    "symmetric-psd",
    "traced-vs-full",
    "repeatable",
    "dtype",
    "blocking",
    "implementations",
    "finite-difference",
    "single-sample",
    "errors",
    "model-unchanged",
)


@dataclass(frozen=True)
class ConformanceReport:
    """What :func:`run_backend_conformance` checked.

    Attributes:
        backend: the backend's name.
        passed: the checks that passed, in the order they ran.
        skipped: checks that did not run, each with the reason.
    """

    backend: str
    passed: tuple[str, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"backend {self.backend!r}: {len(self.passed)} checks passed ({', '.join(self.passed)})"
        if self.skipped:
            text += "; skipped: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items())
        return text


def run_backend_conformance(
    backend: Any,
    *,
    make_model: Callable[[], Any],
    make_inputs: Callable[[int], Any],
    reference: FiniteDifferenceAccess | None,
    foreign: Sequence[object] = (),
    bad_inputs: Mapping[str, Any] | None = None,
    n_samples: int = 7,
    rtol: float = 1e-6,
    exact_rtol: float = 1e-10,
    float32_rtol: float = 1e-4,
    skip: Collection[str] = (),
) -> ConformanceReport:
    """Check that a backend keeps the contract of :class:`cvcore.protocols.Backend`.

    The checks run in the order of :data:`CHECKS` and stop at the first failure. Kernels
    are compared by :func:`relative_error`; float64 is used wherever two computations of
    one kernel are compared. The model should be small (the finite-difference reference
    costs two forward passes per parameter) with generic, non-integer values.

    Args:
        backend: the backend instance under test (not necessarily registered; when it is,
            the ``registry`` check also asks :func:`cvcore.plugins.select_backend`).
        make_model: builds the model to measure, once.
        make_inputs: ``make_inputs(n)`` returns a batch of ``n`` valid inputs, in any
            form the backend takes; it is called with ``n_samples``, 1 and 0.
        reference: how to difference the model's outputs for the reference Jacobian;
            ``None`` skips the ``finite-difference`` and ``model-unchanged`` checks.
        foreign: objects of other frameworks the backend must not accept, added to
            :data:`FOREIGN`.
        bad_inputs: more invalid inputs, by description (a wrong feature count, a wrong
            dtype ...), for which ``ntk`` must raise a :class:`cvcore.errors.CVCoreError`;
            a string, ``None`` and an empty batch are always tried.
        n_samples: N for the main checks; odd, so that no block size divides it.
        rtol: tolerance against the finite-difference reference.
        exact_rtol: tolerance between two float64 computations of one kernel (blocking,
            implementations, conventions, repeated calls).
        float32_rtol: tolerance between the float32 and the float64 kernel.
        skip: names from :data:`CHECKS` not to run.

    Returns:
        A report naming every check that passed and every check skipped, with why.

    Raises:
        ConformanceFailure: an ``AssertionError`` naming the failed check, what was
            expected and what the backend gave.
        InputError: ``skip`` names an unknown check or ``n_samples`` is below 2.

    Example:
        In a plugin's ``tests/test_backend.py``::

            from cvcore.testing import FiniteDifferenceAccess, run_backend_conformance

            def test_conformance():
                access = FiniteDifferenceAccess(
                    get_params=lambda m: m.flat_params(),
                    forward=lambda m, p, x: m.with_params(p).forward(x))
                report = run_backend_conformance(
                    MyBackend(), make_model=lambda: MyModel(seed=0),
                    make_inputs=lambda n: np.random.default_rng(n).normal(size=(n, 4)),
                    reference=access, bad_inputs={"3 features": np.ones((2, 3))})
                assert "finite-difference" in report.passed
    """
    unknown = sorted(set(skip) - set(CHECKS))
    if unknown:
        raise InputError(f"expected skip= names among {list(CHECKS)}, got {unknown}")
    if n_samples < 2:
        raise InputError(f"expected n_samples of at least 2 (1 is checked separately), got {n_samples}")
    run = _Run(backend=backend, name=str(getattr(backend, "name", type(backend).__name__)),
               make_model=make_model, make_inputs=make_inputs, reference=reference,
               foreign=tuple(foreign), bad_inputs=dict(bad_inputs or {}), n_samples=n_samples,
               rtol=rtol, exact_rtol=exact_rtol, float32_rtol=float32_rtol)
    passed: list[str] = []
    skipped: dict[str, str] = {}
    for name in CHECKS:
        if name in skip:
            skipped[name] = "skipped by the caller"
            continue
        if run.model is None and name not in ("attributes", "available"):
            _start(run, name)
        reason = _CHECK_FUNCTIONS[name](run)
        if reason is None:
            passed.append(name)
        else:
            skipped[name] = reason
    return ConformanceReport(backend=run.name, passed=tuple(passed), skipped=skipped)


def _start(run: _Run, check: str) -> None:
    """Build the model once, and remember its parameters to check they stay unchanged."""
    try:
        run.model = run.make_model()
    except Exception as exc:  # the author's factory failed
        raise run.fail(check, f"expected make_model() to build a model, got "
                                  f"{type(exc).__name__}: {exc}") from exc
    if run.reference is not None:
        run.params_before = np.array(run.reference.get_params(run.model), dtype=np.float64,
                                     copy=True).ravel()

