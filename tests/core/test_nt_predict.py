"""Kernel predictions (:mod:`cvcore.predict`, :mod:`cvcore.kernel_regime`) against closed
forms and against actually training a linearised network.

* A linear model ``f(x) = W x``: its NTK is exact (``K = X Xᵀ ⊗ I``) and gradient flow on
  MSE has a closed form in parameter space, ``W(t) = W* + (W₀ − W*) e^{−τ G}`` with
  ``G = XᵀX`` and ``τ = η t / (N·C)`` — computed here from ``G``'s eigenvectors
  (``D × D``), a different route from the predictor's (``N × N``, function space).
* A tanh network's first-order Taylor model ``f₀ + J (θ − θ₀)`` (``J`` from
  ``torch.func.jacrev``) trained by small-step gradient descent on the same loss; the
  prediction at ``t = steps`` must match up to the discretisation error.
"""

from __future__ import annotations

import numpy as np
import pytest

import cvcore
from cvcore.errors import InputError, KernelError
from cvcore.predict import gradient_descent_mse, regime_distance
from tests.tolerance import rel_error

RNG = np.random.default_rng(3)
N, M, D, C = 6, 4, 3, 2
X, XS = RNG.normal(size=(N, D)), RNG.normal(size=(M, D))
Y = RNG.normal(size=(N, C))
W0 = RNG.normal(size=(C, D))


def linear_flow(t: float, eta: float, normalization: float) -> np.ndarray:
    """``W(t)`` of gradient flow on ``(1/(2·norm)) Σ (W x − y)²`` from ``W₀``."""
    g = X.T @ X
    w_star = np.linalg.solve(g, X.T @ Y).T  # least squares, (C, D)
    lam, u = np.linalg.eigh(g)
    decay = u @ np.diag(np.exp(-lam * eta * t / normalization)) @ u.T
    return w_star + (W0 - w_star) @ decay


@pytest.mark.parametrize("loss", ["mean", "sum"])
@pytest.mark.parametrize("kernel", ["traced", "full"])
def test_linear_model_closed_form(kernel: str, loss: str) -> None:
    k_train = X @ X.T
    k_test = XS @ X.T
    if kernel == "full":  # K ⊗ I, row i·C + c
        k_train, k_test = np.kron(k_train, np.eye(C)), np.kron(k_test, np.eye(C))
    eta = 0.3
    norm = N * C if loss == "mean" else 1.0
    predict = gradient_descent_mse(k_train, Y, learning_rate=eta, loss=loss)
    times = [0.0, 0.5, 4.0, 40.0]
    train, test = predict(times, X @ W0.T, XS @ W0.T, k_test)
    assert train.shape == (4, N, C) and test.shape == (4, M, C)
    for i, t in enumerate(times):
        w = linear_flow(t, eta, norm)
        assert rel_error(train[i], X @ w.T) < 1e-10
        assert rel_error(test[i], XS @ w.T) < 1e-10
    w_inf = np.linalg.solve(X.T @ X, X.T @ Y).T
    train_inf, test_inf = predict(None, X @ W0.T, XS @ W0.T, k_test)
    assert rel_error(test_inf, XS @ w_inf.T) < 1e-10
    assert rel_error(train_inf, X @ w_inf.T) < 1e-10


def test_neural_tangents_conventions() -> None:
    """Time is ``learning_rate · t`` and the normalisation ``y.size``; ``diag_reg`` is
    relative to the mean diagonal: values written from neural-tangents' definition."""
    k = np.array([[2.0, 0.5], [0.5, 1.0]])
    y = np.array([[1.0], [-1.0]])
    f0 = np.zeros((2, 1))
    # τ = η t / 2; f_t = y − e^{−Kτ} y  (f0 = 0)
    lam, u = np.linalg.eigh(k)
    want = y - u @ np.diag(np.exp(-lam * 0.1 * 3.0 / 2)) @ u.T @ y
    assert rel_error(gradient_descent_mse(k, y, learning_rate=0.1)(3.0, f0), want) < 1e-12
    assert rel_error(gradient_descent_mse(k, y, learning_rate=0.3)(1.0, f0), want) < 1e-12
    reg = k + 0.5 * np.trace(k) / 2 * np.eye(2)
    lam, u = np.linalg.eigh(reg)
    want = y - u @ np.diag(np.exp(-lam * 2.0 / 2)) @ u.T @ y
    assert rel_error(gradient_descent_mse(k, y, diag_reg=0.5)(2.0, f0), want) < 1e-12
    absolute = gradient_descent_mse(k, y, diag_reg=0.75, diag_reg_absolute_scale=True)
    assert rel_error(absolute(2.0, f0), want) < 1e-12  # 0.75 = 0.5 · Tr K / 2


def test_bad_inputs_are_refused() -> None:
    k = np.eye(3)
    with pytest.raises(InputError, match="3 \\(traced\\) or 6 \\(full\\)"):
        gradient_descent_mse(np.eye(4), np.zeros((3, 2)))
    with pytest.raises(KernelError, match="symmetric"):
        gradient_descent_mse(np.triu(np.ones((3, 3))), np.zeros(3))
    with pytest.raises(InputError, match="loss"):
        gradient_descent_mse(k, np.zeros(3), loss="l1")
    with pytest.raises(InputError, match="k_test_train"):
        gradient_descent_mse(k, np.zeros(3))(1.0, np.zeros(3), np.zeros(2))
    with pytest.raises(InputError, match="t >= 0"):
        gradient_descent_mse(k, np.zeros(3))(-1.0)
    with pytest.raises(InputError, match="one shape"):
        regime_distance(np.zeros(3), np.zeros(2), np.zeros(3))


def test_regime_distance_by_hand() -> None:
    d = regime_distance([1.0, 2.0], [1.0, 1.0], [0.0, 0.0])
    assert d.rms == pytest.approx(np.sqrt(0.5))
    assert d.relative == pytest.approx(1 / np.sqrt(2))
    assert d.moved == pytest.approx(np.sqrt(5) / np.sqrt(2))
    assert np.isnan(regime_distance([1.0], [0.0], [0.0]).relative)


def test_training_the_linearised_network_follows_the_prediction() -> None:
    """Small-step GD on the Taylor model of a tanh network (torch, float64) ends where
    ``kernel_predictions`` says; the trained nonlinear network is measured against it."""
    torch = pytest.importorskip("torch")
    from torch.func import functional_call, jacrev

    torch.manual_seed(0)
    width = 64
    model = torch.nn.Sequential(torch.nn.Linear(D, width), torch.nn.Tanh(),
                                torch.nn.Linear(width, C)).double()
    x, xs = torch.tensor(X), torch.tensor(XS)
    theta0 = {k: v.detach().clone() for k, v in model.named_parameters()}

    def flat_jac(inputs: torch.Tensor) -> torch.Tensor:
        jac = jacrev(lambda p: functional_call(model, p, (inputs,)))(theta0)
        return torch.cat([jac[k].reshape(inputs.shape[0] * C, -1) for k in theta0], dim=1)

    j_train, j_test = flat_jac(x), flat_jac(xs)
    with torch.no_grad():
        f0, f0_test = model(x).reshape(-1), model(xs).reshape(-1)
    y = torch.tensor(Y).reshape(-1)
    eta, steps = 0.05, 720  # η·λ_max/(N·C) ≈ 0.23: stable steps; τ·λ_min ≈ 0.9
    delta = torch.zeros(j_train.shape[1], dtype=torch.float64)
    for _ in range(steps):  # L = (1/(2·N·C)) Σ (f_lin − y)²
        residual = f0 + j_train @ delta - y
        delta -= eta * (j_train.T @ residual) / (N * C)
    lin_train = (f0 + j_train @ delta).reshape(N, C).numpy()
    lin_test = (f0_test + j_test @ delta).reshape(M, C).numpy()

    pred = cvcore.kernel_predictions(model, X, Y, t=steps, x_test=XS, learning_rate=eta)
    assert pred.train.shape == (N, C)
    moved = np.abs(lin_train - f0.reshape(N, C).numpy()).max()
    assert moved > 0.1  # training moved the outputs: the comparison says something
    # discrete steps against the flow: the error is first order in η·λ/(N·C)
    assert rel_error(pred.train, lin_train) < 1e-3
    assert rel_error(pred.test, lin_test) < 1e-3
    d = regime_distance(lin_test, pred.test, pred.initial_test)
    assert d.relative < 1e-3

    trained = torch.nn.Sequential(torch.nn.Linear(D, width), torch.nn.Tanh(),
                                  torch.nn.Linear(width, C)).double()
    trained.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(trained.parameters(), lr=eta)
    for _ in range(steps):
        opt.zero_grad()
        loss = 0.5 * ((trained(x) - torch.tensor(Y)) ** 2).mean()
        loss.backward()
        opt.step()
    dist = cvcore.kernel_regime_distance(model, trained, X, Y, steps, XS, learning_rate=eta)
    with torch.no_grad():
        net_test = trained(xs).numpy()
    want = regime_distance(net_test, pred.test, pred.initial_test)
    assert dist.relative == pytest.approx(want.relative, rel=1e-9)
    # the nonlinear width-64 network stays near its kernel regime, but measurably off it
    # (3 % of the distance the prediction moved, far above the Taylor model's 0.01 %)
    assert 0.005 < dist.relative < 0.2


def test_a_kernel_with_a_negative_direction_is_refused_round_off_is_not() -> None:
    """Gradient descent on -I diverges: no prediction. A float32 kernel's round-off (tiny
    negative eigenvalues of a rank-deficient kernel) is still a kernel."""
    with pytest.raises(KernelError, match="positive semi-definite"):
        cvcore.gradient_descent_mse(-np.eye(3), np.ones(3), 0.1)
    j = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    k32 = (j @ j.T).astype(np.float32)  # rank 3 of 40, float32 round-off
    assert np.linalg.eigvalsh(k32.astype(np.float64))[0] < 0
    predict = cvcore.gradient_descent_mse(k32, np.ones(40), 0.01)
    assert np.isfinite(predict(5.0, np.zeros(40))).all()
