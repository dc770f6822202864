"""The conformance suite's checks, one function per name in
:data:`cvcore.testing.conformance.CHECKS`, each given the run's state (:class:`_Run`)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cvcore.errors import CVCoreError, KernelError, describe
from cvcore.protocols import Backend, Implementation, KernelKind, KernelRequest, KernelResult
from cvcore.spectrum import collective_variables
from cvcore.testing.reference import (
    FiniteDifferenceAccess,
    finite_difference_jacobian,
    kernel_from_jacobian,
    relative_error,
    traced_from_full,
)

#: Objects no backend may accept (a backend's own foreign objects are added to these).
FOREIGN = (object(), "a string", None, 3.5, np.zeros((2, 2)))


#: Memory budgets (bytes) the blocking check uses: one sample and one tensor at a time,
#: and a few samples at a time.
TINY_BUDGETS = (64, 4096)


KINDS: tuple[KernelKind, ...] = ("traced", "full")


class ConformanceFailure(AssertionError):
    """A backend broke the contract; ``check`` names the check that failed."""

    def __init__(self, backend: str, check: str, detail: str) -> None:
        super().__init__(f"backend {backend!r} failed conformance check {check!r}: {detail}")
        self.backend = backend
        self.check = check


@dataclass
class _Run:
    """The state the checks share: the backend, its model, inputs and kernels asked for."""

    backend: Any
    name: str
    make_model: Callable[[], Any]
    make_inputs: Callable[[int], Any]
    reference: FiniteDifferenceAccess | None
    foreign: Sequence[object]
    bad_inputs: Mapping[str, Any]
    n_samples: int
    rtol: float
    exact_rtol: float
    float32_rtol: float
    model: Any = None
    inputs: dict[int, Any] = field(default_factory=dict)
    cache: dict[tuple[Any, ...], KernelResult] = field(default_factory=dict)
    params_before: NDArray[np.float64] | None = None

    def fail(self, check: str, detail: str) -> ConformanceFailure:
        return ConformanceFailure(self.name, check, detail)

    def expect_close(self, check: str, got: Any, want: Any, rtol: float, expected: str) -> None:
        """Fail ``check`` unless ``got`` is within ``rtol`` of ``want`` (max-norm relative
        error); ``expected`` is the message up to its ``, got <error>``."""
        err = relative_error(got, want)
        if err > rtol:
            raise self.fail(check, f"{expected}, got {err:.3g}")

    def get_inputs(self, n: int, check: str) -> Any:
        if n not in self.inputs:
            try:
                self.inputs[n] = self.make_inputs(n)
            except Exception as exc:  # reported as the author's mistake
                raise self.fail(check, f"expected make_inputs({n}) to return a batch of {n} "
                                       f"samples, got {type(exc).__name__}: {exc}") from exc
        return self.inputs[n]

    def ntk(self, check: str, *, kernel: KernelKind = "traced", dtype: str = "float64",
            n: int | None = None, budget: int | None = None,
            implementation: Implementation = Implementation.AUTO, fresh: bool = False
            ) -> KernelResult:
        """The backend's result for one request on ``n`` samples (cached unless ``fresh``)."""
        n = self.n_samples if n is None else n
        key = (kernel, dtype, n, budget, implementation)
        if key in self.cache and not fresh:
            return self.cache[key]
        options: dict[str, Any] = {"kernel": kernel, "dtype": dtype,
                                   "implementation": implementation}
        if budget is not None:
            options["memory_budget"] = budget
        request = KernelRequest(**options)
        try:
            result = self.backend.ntk(self.model, self.get_inputs(n, check), request)
        except Exception as exc:  # any exception here is a failure
            raise self.fail(check, f"expected ntk() to succeed on a batch of {n} valid inputs with "
                                   f"{_show(request)}, got {type(exc).__name__}: {exc}") from exc
        if not isinstance(result, KernelResult):
            raise self.fail(check, f"expected ntk() to return a cvcore.protocols.KernelResult, "
                                   f"got {describe(result)}")
        if not fresh:
            self.cache[key] = result
        return result


def _show(request: KernelRequest) -> str:
    return (f"kernel={request.kernel!r}, dtype={request.dtype!r}, "
            f"memory_budget={request.memory_budget}, "
            f"implementation={request.implementation.value!r}")


def _check_attributes(run: _Run) -> str | None:
    b = run.backend
    name = getattr(b, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise run.fail("attributes", f"expected 'name' to be a non-empty string, got {name!r}")
    extra = getattr(b, "extra", None)
    if not isinstance(extra, str):
        raise run.fail("attributes", f"expected 'extra' to be a string (the cvcore[...] extra), "
                                     f"got {extra!r}")
    modules = getattr(b, "modules", None)
    if not isinstance(modules, tuple) or not modules or not all(
            isinstance(m, str) and m for m in modules):
        raise run.fail("attributes", f"expected 'modules' to be a non-empty tuple of module "
                                     f"names, got {modules!r}")
    missing = [m for m in ("available", "accepts", "ntk") if not callable(getattr(b, m, None))]
    if missing:
        raise run.fail("attributes", f"expected the methods available, accepts and ntk of "
                                     f"cvcore.protocols.Backend, got none for {missing}")
    if not isinstance(b, Backend):
        raise run.fail("attributes", f"expected an object satisfying cvcore.protocols.Backend, "
                                     f"got {type(b).__qualname__}")
    return None


def _check_available(run: _Run) -> str | None:
    ok = run.backend.available()
    if ok is not True:
        raise run.fail("available", f"expected available() to return True where its framework "
                                    f"is installed (the suite needs it), got {ok!r}")
    return None


def _check_accepts(run: _Run) -> str | None:
    b = run.backend
    if not any(m in sys.modules for m in b.modules):
        raise run.fail("accepts", f"expected one of modules {b.modules} to be imported once a "
                                  "model exists (select_backend only asks a backend whose "
                                  "framework is in sys.modules), got none imported")
    verdict = b.accepts(run.model)
    if verdict is not True:
        raise run.fail("accepts", f"expected accepts(model) to be True for make_model()'s "
                                  f"{type(run.model).__qualname__}, got {verdict!r}")
    before = set(sys.modules)
    for obj in (*FOREIGN, *run.foreign):
        try:
            verdict = b.accepts(obj)
        except Exception as exc:  # accepts must never raise
            raise run.fail("accepts", f"expected accepts() to return False for a foreign "
                                      f"{describe(obj)}, got {type(exc).__name__}: {exc}") from exc
        if verdict is not False:
            raise run.fail("accepts", f"expected accepts() to return False for a foreign "
                                      f"{describe(obj)}, got {verdict!r}")
    new = sorted(set(sys.modules) - before)
    if new:
        raise run.fail("accepts", f"expected accepts() to import nothing (check sys.modules, "
                                  f"then isinstance), got new modules {new[:5]}")
    return None


def _check_registry(run: _Run) -> str | None:
    from cvcore import plugins

    registered = plugins.registry().backends.get(run.name)
    if registered is None:
        return "not registered under its name (register or install the plugin to check selection)"
    if type(registered) is not type(run.backend):
        raise run.fail("registry", f"expected the registry to hold this "
                                   f"{type(run.backend).__qualname__} under {run.name!r}, got a "
                                   f"{type(registered).__qualname__} registered first")
    try:
        chosen = plugins.select_backend(run.model)
    except CVCoreError as exc:
        raise run.fail("registry", f"expected select_backend(model) to choose {run.name!r}, "
                                   f"got {type(exc).__name__}: {exc}") from exc
    if chosen.name != run.name:
        raise run.fail("registry", f"expected select_backend(model) to choose {run.name!r}, got "
                                   f"{chosen.name!r} (registered earlier, and it accepts the model)")
    return None


def _check_shapes(run: _Run) -> str | None:
    n = run.n_samples
    traced = run.ntk("shapes", kernel="traced")
    full = run.ntk("shapes", kernel="full")
    for res in (traced, full):
        for attr in ("n_samples", "n_outputs", "n_params"):
            value = getattr(res, attr)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise run.fail("shapes", f"expected KernelResult.{attr} to be a positive int, "
                                         f"got {value!r}")
        if not isinstance(res.kernel, np.ndarray):
            raise run.fail("shapes", f"expected the kernel as a NumPy ndarray (a backend crosses "
                                     f"the framework boundary once), got {describe(res.kernel)}")
        if res.n_samples != n:
            raise run.fail("shapes", f"expected n_samples == {n} for {n} inputs, got {res.n_samples}")
        if not isinstance(res.device, str):
            raise run.fail("shapes", f"expected KernelResult.device to be a string, got {res.device!r}")
    if (full.n_outputs, full.n_params) != (traced.n_outputs, traced.n_params):
        raise run.fail("shapes", f"expected the same n_outputs and n_params for both "
                                 f"conventions, got traced ({traced.n_outputs}, {traced.n_params}) "
                                 f"and full ({full.n_outputs}, {full.n_params})")
    o = traced.n_outputs
    if traced.kernel.shape != (n, n):
        raise run.fail("shapes", f"expected a traced kernel of shape ({n}, {n}), got "
                                 f"{traced.kernel.shape}")
    if full.kernel.shape != (n * o, n * o):
        raise run.fail("shapes", f"expected a full kernel of shape ({n * o}, {n * o}) "
                                 f"(N={n}, O={o}), got {full.kernel.shape}")
    return None


def _check_symmetric_psd(run: _Run) -> str | None:
    for kind in KINDS:
        for dtype in ("float64", "float32"):
            res = run.ntk("symmetric-psd", kernel=kind, dtype=dtype)
            try:
                collective_variables(res.kernel)
            except KernelError as exc:
                raise run.fail("symmetric-psd", f"expected a symmetric positive semi-definite "
                                                f"{kind} {dtype} kernel with positive trace, "
                                                f"got: {exc}") from exc
    return None


def _check_traced_vs_full(run: _Run) -> str | None:
    traced = run.ntk("traced-vs-full", kernel="traced").kernel
    full = run.ntk("traced-vs-full", kernel="full").kernel
    expected = traced_from_full(full, run.n_samples)
    run.expect_close("traced-vs-full", traced, expected, run.exact_rtol,
                     "expected the traced kernel to equal the mean of the full kernel's "
                     f"output-diagonal blocks (row i·O + o) within {run.exact_rtol:g} relative")
    return None


def _check_repeatable(run: _Run) -> str | None:
    for kind in KINDS:
        first = run.ntk("repeatable", kernel=kind).kernel
        again = run.ntk("repeatable", kernel=kind, fresh=True).kernel
        run.expect_close("repeatable", again, first, run.exact_rtol,
                         f"expected the same {kind} kernel from two identical calls within "
                         f"{run.exact_rtol:g}")
    return None


def _check_dtype(run: _Run) -> str | None:
    for kind in KINDS:
        k64 = run.ntk("dtype", kernel=kind, dtype="float64").kernel
        k32 = run.ntk("dtype", kernel=kind, dtype="float32").kernel
        if k64.dtype != np.float64 or k32.dtype != np.float32:
            raise run.fail("dtype", f"expected {kind} kernels of dtype float64 and float32 for "
                                    f"dtype='float64' and 'float32', got {k64.dtype} and {k32.dtype}")
        run.expect_close("dtype", k32, k64, run.float32_rtol,
                         f"expected the float32 {kind} kernel within {run.float32_rtol:g} of "
                         "the float64 one")
        if np.array_equal(k64, k64.astype(np.float32).astype(np.float64)):
            raise run.fail("dtype", f"expected a {kind} kernel computed in float64 for "
                                    f"dtype='float64', got one whose every entry is exactly a "
                                    f"float32 value (computed in float32 and cast?; make_inputs "
                                    f"must give generic, non-integer values)")
    return None


def _check_blocking(run: _Run) -> str | None:
    for impl in (Implementation.AUTO, Implementation.JACOBIAN):
        for kind in KINDS:
            whole = run.ntk("blocking", kernel=kind).kernel
            for budget in TINY_BUDGETS:
                blocked = run.ntk("blocking", kernel=kind, budget=budget, implementation=impl)
                run.expect_close("blocking", blocked.kernel, whole, run.exact_rtol,
                                 f"expected the same {kind} kernel with memory_budget={budget} "
                                 f"and implementation={impl.value!r} as with the default "
                                 f"budget, within {run.exact_rtol:g}")
    return None


def _check_implementations(run: _Run) -> str | None:
    for kind in KINDS:
        auto = run.ntk("implementations", kernel=kind).kernel
        for impl in Implementation:
            other = run.ntk("implementations", kernel=kind, implementation=impl).kernel
            run.expect_close("implementations", other, auto, run.exact_rtol,
                             f"expected implementation={impl.value!r} to give the {kind} "
                             f"kernel of 'auto' within {run.exact_rtol:g}")
    return None


def _check_single_sample(run: _Run) -> str | None:
    traced = run.ntk("single-sample", kernel="traced", n=1)
    full = run.ntk("single-sample", kernel="full", n=1)
    o = full.n_outputs
    if traced.n_samples != 1 or traced.kernel.shape != (1, 1) or full.kernel.shape != (o, o):
        raise run.fail("single-sample", f"expected kernels of shape (1, 1) and ({o}, {o}) for one "
                                        f"sample, got n_samples={traced.n_samples} and shapes "
                                        f"{traced.kernel.shape}, {full.kernel.shape}")
    err = relative_error(traced.kernel, traced_from_full(full.kernel, 1))
    if err > run.exact_rtol:
        raise run.fail("single-sample", f"expected the traced kernel of one sample to be the "
                                        f"mean diagonal of its full kernel, got error {err:.3g}")
    for res in (traced, full):
        try:
            collective_variables(res.kernel)
        except KernelError as exc:
            raise run.fail("single-sample", f"expected a valid kernel for one sample, got: {exc}"
                           ) from exc
    if run.reference is not None:
        _compare_reference(run, "single-sample", 1)
    return None


def _check_errors(run: _Run) -> str | None:
    cases = {"a string": "not an array", "None": None,
             "an empty batch (make_inputs(0))": run.get_inputs(0, "errors"), **run.bad_inputs}
    for label, bad in cases.items():
        try:
            result = run.backend.ntk(run.model, bad, KernelRequest())
        except CVCoreError:
            continue
        except Exception as exc:  # the point of the check
            raise run.fail("errors", f"expected a cvcore.errors.CVCoreError subclass (such as "
                                     f"InputError) for {label}, got a bare "
                                     f"{type(exc).__module__}.{type(exc).__name__}: {exc}") from exc
        shape = getattr(getattr(result, "kernel", None), "shape", None)
        raise run.fail("errors", f"expected a cvcore.errors.CVCoreError for {label}, got a "
                                 f"result (kernel shape {shape})")
    return None


def _compare_reference(run: _Run, check: str, n: int) -> None:
    assert run.reference is not None
    jac = finite_difference_jacobian(run.reference, run.model, run.get_inputs(n, check))
    for kind in KINDS:
        res = run.ntk(check, kernel=kind, n=n)
        if (res.n_outputs, res.n_params) != (jac.shape[1], jac.shape[2]):
            raise run.fail(check, f"expected n_outputs={jac.shape[1]} and n_params="
                                  f"{jac.shape[2]} (from the reference's forward and "
                                  f"get_params), got {res.n_outputs} and {res.n_params}")
        run.expect_close(check, res.kernel, kernel_from_jacobian(jac, kind), run.rtol,
                         f"expected the float64 {kind} kernel on {n} samples within "
                         f"{run.rtol:g} relative of the finite-difference reference")


def _check_finite_difference(run: _Run) -> str | None:
    if run.reference is None:
        return "no FiniteDifferenceAccess given (reference=None)"
    _compare_reference(run, "finite-difference", run.n_samples)
    return None


def _check_model_unchanged(run: _Run) -> str | None:
    if run.reference is None or run.params_before is None:
        return "no FiniteDifferenceAccess given to read the parameters"
    after = np.asarray(run.reference.get_params(run.model), dtype=np.float64).ravel()
    if after.shape != run.params_before.shape or not np.array_equal(after, run.params_before):
        raise run.fail("model-unchanged", "expected the model's parameters unchanged by ntk(), "
                                          f"got a change of {relative_error(after, run.params_before):.3g} "
                                          "relative")
    return None


_CHECK_FUNCTIONS: dict[str, Callable[[_Run], str | None]] = {
    "attributes": _check_attributes,
    "available": _check_available,
    "accepts": _check_accepts,
    "registry": _check_registry,
    "shapes": _check_shapes,
    "symmetric-psd": _check_symmetric_psd,
    "traced-vs-full": _check_traced_vs_full,
    "repeatable": _check_repeatable,
    "dtype": _check_dtype,
    "blocking": _check_blocking,
    "implementations": _check_implementations,
    "finite-difference": _check_finite_difference,
    "single-sample": _check_single_sample,
    "errors": _check_errors,
    "model-unchanged": _check_model_unchanged,
}

