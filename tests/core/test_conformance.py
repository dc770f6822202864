"""The backend conformance kit (cvcore.testing): it passes correct backends (the built-in
torch backend, a tiny inline one) and fails each deliberately broken one at the right check."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from cvcore import plugins
from cvcore.errors import InputError
from cvcore.hookspecs import hookimpl
from cvcore.protocols import Implementation, KernelRequest, KernelResult
from cvcore.testing import (
    CHECKS,
    ConformanceFailure,
    FiniteDifferenceAccess,
    finite_difference_jacobian,
    kernel_from_jacobian,
    relative_error,
    run_backend_conformance,
    traced_from_full,
)

# --- a tiny inline backend -------------------------------------------------------------


class FeatureModel:
    """``f(x) = W tanh(A x)``; only ``W`` (O × H) is trainable, ``A`` is a fixed projection.

    ``J_{i,o} = e_o ⊗ φ(x_i)`` with ``φ(x) = tanh(A x)``, so the traced kernel is ``Φ Φᵀ``
    and the full one ``Φ Φᵀ ⊗ I_O``.
    """

    def __init__(self, n_in: int = 3, hidden: int = 8, n_out: int = 2, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.normal(size=(hidden, n_in))
        self.w = rng.normal(size=(n_out, hidden))

    def features(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x @ self.a.T.astype(x.dtype))


def feature_access() -> FiniteDifferenceAccess:
    def forward(model: FeatureModel, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        w = params.reshape(model.w.shape)
        return model.features(np.asarray(x, dtype=np.float64)) @ w.T

    return FiniteDifferenceAccess(get_params=lambda m: m.w.ravel(), forward=forward)


def feature_inputs(n: int) -> np.ndarray:
    return np.random.default_rng(100 + n).normal(size=(n, 3))


class InlineBackend:
    name = "inline-features"
    extra = ""
    modules = ("numpy",)

    def available(self) -> bool:
        return True

    def accepts(self, model: object) -> bool:
        return isinstance(model, FeatureModel)

    def validate(self, model: FeatureModel, inputs: Any, dtype: type) -> np.ndarray:
        if not isinstance(inputs, np.ndarray) or inputs.dtype.kind not in "fiu":
            raise InputError(f"expected a numeric ndarray, got {type(inputs).__name__}")
        if inputs.ndim != 2 or inputs.shape[1] != model.a.shape[1] or inputs.shape[0] == 0:
            raise InputError(f"expected inputs of shape (N>0, {model.a.shape[1]}), got {inputs.shape}")
        return inputs.astype(dtype)

    def gram(self, model: FeatureModel, inputs: Any, request: KernelRequest) -> np.ndarray:
        dtype = np.float64 if request.dtype == "float64" else np.float32
        phi = model.features(self.validate(model, inputs, dtype))
        return phi @ phi.T

    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        gram = self.gram(model, inputs, request)
        o = model.w.shape[0]
        kernel = gram if request.kernel == "traced" else np.kron(gram, np.eye(o, dtype=gram.dtype))
        return KernelResult(kernel=kernel, n_samples=gram.shape[0], n_outputs=o,
                            n_params=model.w.size)


class InlinePlugin:
    @hookimpl
    def cvcore_register_backends(self, register: Any) -> None:
        register(InlineBackend())


@pytest.fixture
def inline_plugin():
    plugin = InlinePlugin()
    plugins.register(plugin, name="inline-conformance-plugin")
    yield plugin
    plugins.unregister(plugin)


def run_inline(backend: Any, **kwargs: Any):
    return run_backend_conformance(backend, make_model=FeatureModel, make_inputs=feature_inputs,
                                   reference=feature_access(),
                                   bad_inputs={"4 features instead of 3": np.ones((2, 4))},
                                   **kwargs)


def test_inline_backend_passes_every_check_when_registered(inline_plugin) -> None:
    report = run_inline(InlineBackend())
    assert report.passed == CHECKS
    assert report.skipped == {}
    assert "15 checks passed" in str(report)


def test_unregistered_backend_skips_only_the_registry_check() -> None:
    report = run_inline(InlineBackend())
    assert set(report.skipped) == {"registry"}
    assert "not registered" in report.skipped["registry"]
    assert len(report.passed) == len(CHECKS) - 1


def test_without_reference_the_reference_checks_are_skipped() -> None:
    report = run_backend_conformance(InlineBackend(), make_model=FeatureModel,
                                     make_inputs=feature_inputs, reference=None,
                                     skip=("registry",))
    assert set(report.skipped) == {"registry", "finite-difference", "model-unchanged"}
    assert report.skipped["registry"] == "skipped by the caller"


# --- deliberately broken backends: each must fail at its check ------------------------


class NonSymmetric(InlineBackend):
    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        res = super().ntk(model, inputs, request)
        k = res.kernel + 1e-3 * np.abs(res.kernel).max() * np.triu(np.ones_like(res.kernel), 1)
        return KernelResult(k, res.n_samples, res.n_outputs, res.n_params)


class IgnoresTraced(InlineBackend):
    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        return super().ntk(model, inputs, KernelRequest(**{**request.__dict__, "kernel": "full"}))


class SumsOverOutputs(InlineBackend):
    """Traced kernel summed over outputs instead of averaged (the old reference bug)."""

    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        res = super().ntk(model, inputs, request)
        k = res.kernel * res.n_outputs if request.kernel == "traced" else res.kernel
        return KernelResult(k, res.n_samples, res.n_outputs, res.n_params)


class PhantomBias(InlineBackend):
    """Consistent in both conventions, symmetric and PSD, but differentiates a bias the
    model does not have: only the finite-difference reference can tell."""

    def gram(self, model: FeatureModel, inputs: Any, request: KernelRequest) -> np.ndarray:
        g = super().gram(model, inputs, request)
        return g + np.ones_like(g)


class IgnoresDtype(InlineBackend):
    def gram(self, model: FeatureModel, inputs: Any, request: KernelRequest) -> np.ndarray:
        return super().gram(model, inputs, KernelRequest(dtype="float64"))


class Float32Inside(InlineBackend):
    def gram(self, model: FeatureModel, inputs: Any, request: KernelRequest) -> np.ndarray:
        g = super().gram(model, inputs, KernelRequest(dtype="float32"))
        return g.astype(np.float64 if request.dtype == "float64" else np.float32)


class BudgetDependent(InlineBackend):
    def gram(self, model: FeatureModel, inputs: Any, request: KernelRequest) -> np.ndarray:
        g = super().gram(model, inputs, request)
        return g * (1.0 + 1e-6) if request.memory_budget < 1 << 20 else g


class StructuredDiffers(InlineBackend):
    def gram(self, model: FeatureModel, inputs: Any, request: KernelRequest) -> np.ndarray:
        g = super().gram(model, inputs, request)
        return 2 * g if request.implementation is Implementation.STRUCTURED else g


class SqueezesBatch(InlineBackend):
    """``np.squeeze`` drops the batch axis when N = 1."""

    def gram(self, model: FeatureModel, inputs: Any, request: KernelRequest) -> np.ndarray:
        g = super().gram(model, inputs, request)
        return np.squeeze(g)


class BareErrors(InlineBackend):
    def validate(self, model: FeatureModel, inputs: Any, dtype: type) -> np.ndarray:
        return np.asarray(inputs).astype(dtype)


class AcceptsAnything(InlineBackend):
    def accepts(self, model: object) -> bool:
        return True


class MutatesModel(InlineBackend):
    def ntk(self, model: Any, inputs: Any, request: KernelRequest) -> KernelResult:
        model.w *= 1.0 + 1e-9
        return super().ntk(model, inputs, request)


class NoModules(InlineBackend):
    modules = ()  # type: ignore[assignment]


BROKEN = {
    "non-symmetric": (NonSymmetric, "symmetric-psd", "symmetric"),
    "ignores-traced": (IgnoresTraced, "shapes", r"traced kernel of shape \(7, 7\)"),
    "sums-over-outputs": (SumsOverOutputs, "traced-vs-full", "output-diagonal blocks"),
    "phantom-bias": (PhantomBias, "finite-difference", "finite-difference reference"),
    "ignores-dtype": (IgnoresDtype, "dtype", "float64 and float32"),
    "float32-inside": (Float32Inside, "dtype", "exactly a float32 value"),
    "budget-dependent": (BudgetDependent, "blocking", "memory_budget=64"),
    "structured-differs": (StructuredDiffers, "implementations", "'structured'"),
    "squeezes-batch": (SqueezesBatch, "single-sample", "a batch of 1 valid inputs"),
    "bare-errors": (BareErrors, "errors", "a string, got a bare"),
    "accepts-anything": (AcceptsAnything, "accepts", "False for a foreign object"),
    "mutates-model": (MutatesModel, "model-unchanged", "parameters unchanged"),
    "no-modules": (NoModules, "attributes", "non-empty tuple"),
}


@pytest.mark.parametrize("case", sorted(BROKEN), ids=sorted(BROKEN))
def test_broken_backend_fails_at_its_check(case: str) -> None:
    cls, check, message = BROKEN[case]
    with pytest.raises(AssertionError, match=message) as info:
        run_inline(cls())
    assert isinstance(info.value, ConformanceFailure)
    assert info.value.check == check
    assert str(info.value).startswith(f"backend 'inline-features' failed conformance check '{check}'")


def test_name_clash_in_the_registry_fails(inline_plugin) -> None:
    class Impostor(InlineBackend):
        pass

    with pytest.raises(ConformanceFailure, match="registered first") as info:
        run_inline(Impostor())
    assert info.value.check == "registry"


def test_caller_mistakes_are_input_errors() -> None:
    with pytest.raises(InputError, match=r"skip= names .* got \['symmetry'\]"):
        run_inline(InlineBackend(), skip=("symmetry",))
    with pytest.raises(InputError, match="n_samples of at least 2"):
        run_inline(InlineBackend(), n_samples=1)


# --- the reference machinery against closed forms --------------------------------------


def test_finite_difference_jacobian_matches_the_closed_form() -> None:
    model, x = FeatureModel(n_in=3, hidden=4, n_out=2), feature_inputs(5)
    jac = finite_difference_jacobian(feature_access(), model, x)
    phi = np.tanh(x @ model.a.T)
    expected = np.zeros((5, 2, 8))  # ∂f_o/∂W_{o'h} = δ_{oo'} φ_h
    expected[:, 0, :4] = phi
    expected[:, 1, 4:] = phi
    assert relative_error(jac, expected) < 1e-9
    traced = kernel_from_jacobian(jac, "traced")
    full = kernel_from_jacobian(jac, "full")
    assert relative_error(traced, phi @ phi.T) < 1e-9
    assert relative_error(full, np.kron(phi @ phi.T, np.eye(2))) < 1e-9
    assert relative_error(traced_from_full(full, 5), traced) < 1e-14


def test_from_setter_restores_parameters() -> None:
    model = FeatureModel()
    original = model.w.copy()

    def set_params(m: FeatureModel, p: np.ndarray) -> None:
        m.w = p.reshape(m.w.shape).copy()

    access = FiniteDifferenceAccess.from_setter(
        lambda m: m.w.ravel(), set_params, lambda m, x: m.features(x) @ m.w.T)
    jac = finite_difference_jacobian(access, model, feature_inputs(3))
    np.testing.assert_array_equal(model.w, original)
    ref = finite_difference_jacobian(feature_access(), model, feature_inputs(3))
    assert relative_error(jac, ref) < 1e-12


def test_testing_module_imports_no_framework() -> None:
    code = ("import sys, cvcore.testing; "
            "bad = [m for m in ('torch', 'jax', 'tensorflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the built-in torch backend ---------------------------------------------------------


def torch_access() -> FiniteDifferenceAccess:
    torch = pytest.importorskip("torch")
    from torch.func import functional_call

    def get_params(model: Any) -> np.ndarray:
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()

    def forward(model: Any, flat: np.ndarray, x: Any) -> np.ndarray:
        params, start = {}, 0
        for name, p in model.named_parameters():
            piece = flat[start:start + p.numel()].copy()
            params[name] = torch.from_numpy(piece).reshape(p.shape)
            start += p.numel()
        with torch.no_grad():
            return functional_call(model, params, (x.double(),)).numpy()

    return FiniteDifferenceAccess(get_params=get_params, forward=forward)


def test_torch_backend_conforms() -> None:
    torch = pytest.importorskip("torch")
    from cvcore.backends.torch.backend import TorchBackend

    def make_model() -> Any:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))

    def make_inputs(n: int) -> Any:
        return torch.randn(n, 4, generator=torch.Generator().manual_seed(n))

    report = run_backend_conformance(
        TorchBackend(), make_model=make_model, make_inputs=make_inputs, reference=torch_access(),
        foreign=(FeatureModel(),), bad_inputs={"5 features instead of 4": torch.randn(3, 5)})
    assert report.passed == CHECKS
