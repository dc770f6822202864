"""Cross kernels, output axes, kernel–vector products and the NNGP on every backend,
against a float64 reference written from the definition.

The model is the same two-layer tanh network in each framework, ``f(x) = tanh(x W₁ + b₁)
W₂ + b₂`` applied along the last input axis, so a ``(N, H, D)`` input gives a spatial
output ``(N, H, C)``. Its per-sample Jacobian is written out by hand in NumPy
(:func:`jacobian`) and every kernel is an ``einsum`` over it; one test ties that hand
Jacobian to torch autograd, one sample and output at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import cvcore
from cvcore.errors import InputError
from tests.tolerance import rel_error

D, K, C = 4, 5, 3
RNG = np.random.default_rng(7)
# float32-representable weights: every framework stores them exactly, whatever its dtype
W1, B1, W2, B2 = (a.astype(np.float32).astype(np.float64) for a in (
    RNG.normal(size=(D, K)) / 2, RNG.normal(size=K) / 4, RNG.normal(size=(K, C)) / 2,
    RNG.normal(size=C) / 4))
TOL = 1e-10


def forward(x: np.ndarray) -> np.ndarray:
    return np.tanh(x @ W1 + B1) @ W2 + B2


def jacobian(x: np.ndarray) -> np.ndarray:
    """``∂f(x_i)/∂θ`` by hand: ``(N, *S, P)``, θ = (W₁, b₁, W₂, b₂) flattened."""
    h = np.tanh(x @ W1 + B1)  # (N, *H, K)
    g = 1 - h**2
    eye = np.eye(C)
    # ∂f_c/∂W1_dk = W2_kc g_k x_d ; ∂f_c/∂b1_k = W2_kc g_k ; ∂f_c/∂W2_kc' = h_k δ_cc' ; ∂f_c/∂b2_c' = δ
    dw1 = np.einsum("kc,...k,...d->...cdk", W2, g, x)
    db1 = np.einsum("kc,...k->...ck", W2, g)
    dw2 = np.einsum("...k,cq->...ckq", h, eye)
    db2 = np.broadcast_to(eye, (*h.shape[:-1], C, C))
    lead = h.shape[:-1] + (C,)
    return np.concatenate([a.reshape(*lead, -1) for a in (dw1, db1, dw2, db2)], axis=-1)


def make_model(backend: str, spatial: bool) -> Any:
    """The network in ``backend``'s framework, with the weights above."""
    if backend == "torch":
        import torch

        m = torch.nn.Sequential(torch.nn.Linear(D, K), torch.nn.Tanh(), torch.nn.Linear(K, C))
        with torch.no_grad():
            for layer, w, b in ((m[0], W1, B1), (m[2], W2, B2)):
                layer.weight.copy_(torch.tensor(w.T))
                layer.bias.copy_(torch.tensor(b))
        return m
    if backend == "jax":
        import jax.numpy as jnp

        params = {"w1": jnp.asarray(W1), "b1": jnp.asarray(B1), "w2": jnp.asarray(W2),
                  "b2": jnp.asarray(B2)}

        def apply_fn(p: Any, x: Any) -> Any:
            return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

        return (apply_fn, params)
    import keras

    shape = (2, D) if spatial else (D,)
    m = keras.Sequential([keras.Input(shape), keras.layers.Dense(K, activation="tanh"),
                          keras.layers.Dense(C)])
    m.set_weights([W1, B1, W2, B2])
    return m


def test_the_hand_jacobian_is_torch_autograd() -> None:
    torch = pytest.importorskip("torch")
    m = make_model("torch", False).double()
    x = RNG.normal(size=(3, D))
    rows = []
    for xi in x:
        out = m(torch.tensor(xi)[None])[0]
        per = []
        for o in range(C):
            grads = torch.autograd.grad(out[o], list(m.parameters()), retain_graph=True)
            # torch's order: W1ᵀ (K, D), b1, W2ᵀ (C, K), b2; the hand order: W1 (D, K) ...
            w1, b1, w2, b2 = (g.numpy() for g in grads)
            per.append(np.concatenate([w1.T.reshape(-1), b1, w2.T.reshape(-1), b2]))
        rows.append(np.stack(per))
    assert rel_error(np.stack(rows), jacobian(x)) < 1e-13


@pytest.mark.parametrize("kernel", ["traced", "full"])
def test_cross_kernel_matches_the_definition(backend_name: str, kernel: str) -> None:
    x1, x2 = RNG.normal(size=(4, D)), RNG.normal(size=(3, D))
    j1, j2 = jacobian(x1), jacobian(x2)
    got = cvcore.ntk(make_model(backend_name, False), x1, x2, kernel=kernel, dtype="float64")
    if kernel == "traced":
        want = np.einsum("icp,jcp->ij", j1, j2) / C
    else:
        want = np.einsum("icp,jdp->icjd", j1, j2).reshape(4 * C, 3 * C)
    assert got.shape == want.shape
    assert rel_error(got, want) < TOL


@pytest.mark.parametrize("kernel", ["traced", "full"])
def test_structured_cross_kernel_is_the_block_of_the_joint_kernel(backend_name: str,
                                                                  kernel: str) -> None:
    """``implementation="structured"``: the structured self kernel of both sets, cut."""
    x1, x2 = RNG.normal(size=(4, D)), RNG.normal(size=(3, D))
    model = make_model(backend_name, False)
    got = cvcore.ntk(model, x1, x2, kernel=kernel, dtype="float64", implementation="structured")
    want = cvcore.ntk(model, x1, x2, kernel=kernel, dtype="float64", implementation="jacobian")
    assert got.shape == want.shape
    assert rel_error(got, want) < TOL


def test_cross_kernel_of_a_set_with_itself_is_its_kernel(backend_name: str) -> None:
    """The cross path and the self kernel (structured where it applies) agree."""
    x = RNG.normal(size=(5, D))
    model = make_model(backend_name, False)
    both = cvcore.ntk(model, x, x, kernel="full", dtype="float64")
    alone = cvcore.ntk(model, x, kernel="full", dtype="float64")
    assert rel_error(both, alone) < TOL


AXES = [
    # (trace_axes, diagonal_axes, reduction, einsum of the reference, divisor)
    ((-1,), (), "mean", "ihcp,jgcp->ijhg", C),
    ((-1,), (), "sum", "ihcp,jgcp->ijhg", 1),
    ((), (1,), "mean", "ihcp,jhdp->ijhcd", 1),
    ((2,), (1,), "mean", "ihcp,jhcp->ijh", C),
    ((1, 2), (), "sum", "ihcp,jhcp->ij", 1),
    ((), (), "mean", "ihcp,jgdp->ijhgcd", 1),
]


@pytest.mark.parametrize(("trace", "diag", "reduction", "spec", "divisor"), AXES)
def test_output_axes_match_the_definition(backend_name: str, trace: tuple[int, ...],
                                          diag: tuple[int, ...], reduction: str, spec: str,
                                          divisor: int) -> None:
    """A spatial output ``(N, H, C)``: traced, diagonal and kept axes in neural-tangents'
    layout, summed or averaged."""
    x1, x2 = RNG.normal(size=(3, 2, D)), RNG.normal(size=(2, 2, D))
    want = np.einsum(spec, jacobian(x1), jacobian(x2)) / divisor
    got = cvcore.ntk(make_model(backend_name, True), x1, x2, trace_axes=trace,
                     diagonal_axes=diag, trace_reduction=reduction, dtype="float64")
    assert got.shape == want.shape
    assert rel_error(got, want) < TOL


def test_batch_axis_diagonal_gives_per_sample_kernels(backend_name: str) -> None:
    x = RNG.normal(size=(3, D))
    j = jacobian(x)
    got = cvcore.ntk(make_model(backend_name, False), x, trace_axes=(), diagonal_axes=(0,),
                     dtype="float64")
    assert rel_error(got, np.einsum("icp,idp->icd", j, j)) < TOL


@pytest.mark.parametrize("kernel", ["traced", "full"])
def test_kernel_vector_products(backend_name: str, kernel: str) -> None:
    x1, x2 = RNG.normal(size=(4, D)), RNG.normal(size=(3, D))
    j1, j2 = jacobian(x1), jacobian(x2)
    width = 1 if kernel == "traced" else C
    model = make_model(backend_name, False)
    if kernel == "traced":
        k12, k11 = (np.einsum("icp,jcp->ij", a, b) / C for a, b in ((j1, j2), (j1, j1)))
    else:
        k12, k11 = (np.einsum("icp,jdp->icjd", a, b).reshape(a.shape[0] * C, -1)
                    for a, b in ((j1, j2), (j1, j1)))
    v2 = RNG.normal(size=(3 * width, 2))
    v1 = RNG.normal(size=4 * width)
    cross = cvcore.kernel_vector_product(model, x1, v2, x2, kernel=kernel, dtype="float64")
    assert rel_error(cross, k12 @ v2) < TOL
    alone = cvcore.kernel_vector_product(model, x1, v1, kernel=kernel, dtype="float64")
    assert rel_error(alone, k11 @ v1) < TOL


def test_nngp_matches_the_outputs_gram(backend_name: str) -> None:
    x1, x2 = RNG.normal(size=(3, 2, D)), RNG.normal(size=(2, 2, D))
    f1, f2 = forward(x1), forward(x2)
    model = make_model(backend_name, True)
    got = cvcore.nngp(model, x1, x2, dtype="float64")  # traced: mean over H·C
    assert rel_error(got, np.einsum("ihc,jhc->ij", f1, f2) / (2 * C)) < TOL
    got = cvcore.nngp(model, x1, x2, trace_axes=(-1,), diagonal_axes=(1,), dtype="float64")
    assert rel_error(got, np.einsum("ihc,jhc->ijh", f1, f2) / C) < TOL


def test_cross_kernels_refuse_what_they_cannot_do() -> None:
    pytest.importorskip("torch")
    model = make_model("torch", False)
    x1, x2 = RNG.normal(size=(3, D)), RNG.normal(size=(2, D))
    with pytest.raises(InputError, match="implementation 'auto' or 'jacobian' with output axes"):
        cvcore.ntk(model, x1, x2, trace_axes=(), implementation="structured")
    with pytest.raises(InputError, match="train=False"):
        cvcore.ntk(model, x1, x2, train=True)
    with pytest.raises(InputError, match="at least one input sample"):
        cvcore.ntk(model, x1, x2[:0])
    with pytest.raises(InputError, match="batches of one size"):
        cvcore.ntk(model, x1, x2, trace_axes=(), diagonal_axes=(0,))
    with pytest.raises(InputError, match="either traced or diagonal"):
        cvcore.ntk(model, x1, trace_axes=(-1,), diagonal_axes=(-1,))
    with pytest.raises(InputError, match="trace_reduction"):
        cvcore.ntk(model, x1, trace_reduction="max")


@pytest.mark.parametrize("backend_name", ["torch", "jax"], indirect=True)
def test_batch_axis_not_first(backend_name: str) -> None:
    """neural-tangents' ``vmap_axes``: the model takes ``(D, N)`` and returns ``(C, N)``."""
    x1, x2 = RNG.normal(size=(4, D)), RNG.normal(size=(3, D))
    want = np.einsum("icp,jcp->ij", jacobian(x1), jacobian(x2)) / C
    if backend_name == "torch":
        import torch

        inner = make_model("torch", False)

        class Transposed(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, x: Any) -> Any:
                return self.inner(x.T).T

        model: Any = Transposed()
    else:
        import jax.numpy as jnp

        fn, params = make_model("jax", False)
        model = (lambda p, x: fn(p, jnp.transpose(x)).T, params)
    got = cvcore.ntk(model, x1.T, x2.T, vmap_axes=(1, 1, {}), dtype="float64")
    assert rel_error(got, want) < TOL
    with pytest.raises(InputError, match="train=True"):
        cvcore.ntk(model, x1.T, vmap_axes=None)


def test_kernel_predictions_from_a_model(backend_name: str) -> None:
    """``kernel_predictions`` on each backend: the predictor fed the hand-made kernels
    and outputs gives the same numbers."""
    x, xs, y = RNG.normal(size=(5, D)), RNG.normal(size=(3, D)), RNG.normal(size=(5, C))
    j, js = jacobian(x), jacobian(xs)
    k_tt = np.einsum("icp,jdp->icjd", j, j).reshape(5 * C, 5 * C)
    k_st = np.einsum("icp,jdp->icjd", js, j).reshape(3 * C, 5 * C)
    want_train, want_test = cvcore.gradient_descent_mse(k_tt, y, learning_rate=0.5)(
        [2.0, np.inf], forward(x), forward(xs), k_st)
    got = cvcore.kernel_predictions(make_model(backend_name, False), x, y, t=[2.0, np.inf],
                                    x_test=xs, learning_rate=0.5)
    assert rel_error(got.train, want_train) < 1e-8
    assert rel_error(got.test, want_test) < 1e-8
    assert rel_error(got.initial_test, forward(xs)) < 1e-12
