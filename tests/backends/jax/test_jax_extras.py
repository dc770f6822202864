"""The JAX backend's kernel-free paths: ``diagonal`` and the matrix-free ``operator``,
against the formed kernel (``cvcore.ntk``), and ``estimate`` against ``measure``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
flax = pytest.importorskip("flax")
eqx = pytest.importorskip("equinox")
from cvcore.backends.jax import structured as jax_structured
from cvcore.backends.jax.backend import JaxBackend
from flax import linen as nn

import cvcore
from cvcore.api import make_request
from cvcore.errors import InputError
from tests.tolerance import rel_error as rel

O = 3


def mlp_apply(p: Any, x: Any) -> Any:
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def make_pair(d_in: int = 4, hidden: int = 6) -> tuple[Any, Any]:
    k = jax.random.split(jax.random.key(1), 2)
    params = {"w1": jax.random.normal(k[0], (d_in, hidden)), "b1": jnp.full((hidden,), 0.1),
              "w2": jax.random.normal(k[1], (hidden, O)) / 2, "b2": jnp.zeros(O)}
    return mlp_apply, params


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        x = jnp.tanh(nn.Conv(4, (3, 3))(x))
        return nn.Dense(O)(x.reshape(x.shape[0], -1))


def make_cases() -> dict[str, tuple[Any, np.ndarray]]:
    rng = np.random.default_rng(0)
    cnn = LinenCNN()
    cnn_vars = cnn.init(jax.random.key(2), jnp.ones((1, 5, 5, 1)))
    mlp = eqx.nn.MLP(4, O, 6, depth=2, activation=jnp.tanh, key=jax.random.key(4))
    return {"pair": (make_pair(), rng.normal(size=(7, 4))),
            "linen-cnn": ((cnn, cnn_vars), rng.normal(size=(6, 5, 5, 1))),
            "equinox": (mlp, rng.normal(size=(7, 4)))}


CASES = make_cases()
BACKEND = JaxBackend()


@pytest.fixture(autouse=True)
def x64_flag_unchanged() -> Any:
    before = jax.config.jax_enable_x64
    yield
    assert jax.config.jax_enable_x64 == before
    assert jnp.ones(1).dtype == (jnp.float64 if before else jnp.float32)


@pytest.mark.parametrize("kernel", ["traced", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_diagonal_matches_kernel(case: str, kernel: str) -> None:
    model, x = CASES[case]
    k = cvcore.ntk(model, x, kernel=kernel, dtype="float64")
    for budget in (None, 300):  # tiny: one sample per chunk, one leaf per group
        diag = BACKEND.diagonal(model, x, make_request(kernel=kernel, dtype="float64",
                                                       memory_budget=budget))
        assert diag.dtype == np.float64 and diag.shape == (k.shape[0],)
        assert rel(diag, np.diag(k)) < 1e-12
    f32 = BACKEND.diagonal(model, x, make_request(kernel=kernel))
    assert f32.dtype == np.float32 and rel(f32, np.diag(k)) < 1e-4


@pytest.mark.parametrize("kernel", ["traced", "full"])
def test_measure_trace_never_forms_the_kernel(kernel: str, monkeypatch: Any) -> None:
    model, x = CASES["linen-cnn"]
    k = cvcore.ntk(model, x, kernel=kernel, dtype="float64")
    full = cvcore.collective_variables(k)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the kernel was formed")

    monkeypatch.setattr(jax_structured, "kernel_of", refuse)  # the rules, else the Jacobian path
    part = cvcore.measure(model, x, dtype="float64", kernel=kernel,
                          variables=("trace", "self_entropy", "magnitude_variance"))
    assert isinstance(part, cvcore.DiagonalVariables) and part.dim == k.shape[0]
    assert part.trace == pytest.approx(np.trace(k), rel=1e-12)
    assert part.self_entropy == pytest.approx(full.self_entropy, rel=1e-10)
    assert part.magnitude_variance == pytest.approx(full.magnitude_variance, rel=1e-8)


@pytest.mark.parametrize("kernel", ["traced", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_operator_matches_kernel(case: str, kernel: str) -> None:
    model, x = CASES[case]
    k = cvcore.ntk(model, x, kernel=kernel, dtype="float64")
    v = np.random.default_rng(1).standard_normal((k.shape[0], 4))
    ref = k @ v
    for budget in (None, 2_000):  # tiny: one vector per group, small sample chunks
        op = BACKEND.operator(model, x, make_request(kernel=kernel, dtype="float64",
                                                     memory_budget=budget))
        assert op.dim == k.shape[0] and op.n_samples == x.shape[0] and op.n_outputs == O
        assert op.n_params == sum(a.size for a in jax.tree_util.tree_leaves(
            eqx.filter(model, eqx.is_inexact_array) if case == "equinox"
            else model[1] if case == "pair" else model[1]["params"]))
        out = op.matvec(v)
        assert out.dtype == np.float64 and np.abs(out - ref).max() <= 1e-10 * np.abs(ref).max()
        np.testing.assert_allclose(op.matvec(v[:, 0]), ref[:, 0], rtol=1e-10,
                                   atol=1e-10 * np.abs(ref).max())


def test_operator_refuses_train_mode_and_bad_vectors() -> None:
    model, x = CASES["pair"]
    with pytest.raises(InputError, match="train=False"):
        BACKEND.operator(model, x, make_request(train=True))
    op = BACKEND.operator(model, x, make_request())
    with pytest.raises(InputError, match=r"shape \(7, k\)"):
        op.matvec(np.ones((5, 2)))


@pytest.mark.parametrize("kernel", ["traced", "full"])
def test_estimate_agrees_with_measure(kernel: str) -> None:
    n = 300 if kernel == "traced" else 100  # D = 300
    model = make_pair(d_in=8, hidden=32)
    x = np.random.default_rng(3).normal(size=(n, 8))
    cv = cvcore.measure(model, x, kernel=kernel, dtype="float64")
    est = cvcore.estimate(model, x, method="stochastic", kernel=kernel, dtype="float64",
                          probes=16, steps=25, top_k=5)
    assert est.method == "stochastic" and est.dim == cv.dim == 300
    assert est.trace == pytest.approx(cv.trace, rel=1e-10) and est.trace_stderr == 0.0
    assert abs(est.entropy - cv.entropy) <= 4 * est.entropy_stderr + 1e-3
    top = cv.eigenvalues[:5]
    assert np.all(np.abs(est.top_eigenvalues - top) <= est.top_residuals + 1e-9 * top[0])
    assert est.effective_rank == pytest.approx(math.exp(est.entropy))
