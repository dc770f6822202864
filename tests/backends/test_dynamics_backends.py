"""``cvcore.measure(..., targets=)`` on torch, JAX and Keras MLPs against the formulas
applied to a brute-force kernel: the per-sample Jacobians of a one-hidden-layer tanh MLP
written out by hand in NumPy (float64), and ``f(x)`` computed by the framework itself.

``f(x) = tanh(x W1 + b1) W2 + b2``; with ``h = tanh(x W1 + b1)``:
``∂f_o/∂W1[a, b] = x_a (1 − h_b²) W2[b, o]``, ``∂f_o/∂b1[b] = (1 − h_b²) W2[b, o]``,
``∂f_o/∂W2[b, o'] = h_b δ(o, o')``, ``∂f_o/∂b2[o'] = δ(o, o')``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

import cvcore
from cvcore.errors import InputError
from tests.tolerance import rel_error

N, D_IN, WIDTH, O = 10, 4, 6, 3
LABELS = np.array([0, 1, 2, 0, 1, 2, 2, 1, 0, 1])
RNG = np.random.default_rng(7)
X = RNG.normal(size=(N, D_IN))
WEIGHTS = (RNG.normal(size=(D_IN, WIDTH)) / 2, RNG.normal(size=WIDTH) / 4,
           RNG.normal(size=(WIDTH, O)) / 2, RNG.normal(size=O) / 4)


def jacobians(w1, b1, w2, b2) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample Jacobians of the two layers, ``(N, O, P_layer)``, written from the chain rule."""
    h = np.tanh(X @ w1 + b1)
    first = np.zeros((N, O, D_IN * WIDTH + WIDTH))
    second = np.zeros((N, O, WIDTH * O + O))
    for i in range(N):
        for o in range(O):
            for a in range(D_IN):
                for b in range(WIDTH):
                    first[i, o, a * WIDTH + b] = X[i, a] * (1 - h[i, b] ** 2) * w2[b, o]
            for b in range(WIDTH):
                first[i, o, D_IN * WIDTH + b] = (1 - h[i, b] ** 2) * w2[b, o]
                second[i, o, b * O + o] = h[i, b]
            second[i, o, WIDTH * O + o] = 1.0
    return first, second


def kernels(jacs: tuple[np.ndarray, ...], kind: str) -> list[np.ndarray]:
    out = []
    for j in jacs:
        if kind == "traced":
            out.append(np.einsum("iop,jop->ij", j, j) / O)
        else:
            flat = j.reshape(N * O, -1)  # row i·O + o
            out.append(flat @ flat.T)
    return out


def centring(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


def alignment(k: np.ndarray, y: np.ndarray, kind: str) -> float:
    if kind == "traced":
        h, t = centring(N), y @ y.T
    else:
        h, v = np.kron(centring(N), np.eye(O)), y.reshape(-1)
        t = np.outer(v, v)
    kc, tc = h @ k @ h, h @ t @ h
    return float((kc * tc).sum() / (np.linalg.norm(kc) * np.linalg.norm(tc)))


def residual_reference(k: np.ndarray, r: np.ndarray, kind: str) -> tuple[float, np.ndarray]:
    u = np.linalg.svd(k)[0]
    if kind == "full":
        r = r.reshape(-1, 1)
    quad = sum(float(r[:, c] @ k @ r[:, c]) for c in range(r.shape[1]))
    total = float((r * r).sum())
    modes = [float(((u[:, i] @ r) ** 2).sum()) for i in range(k.shape[0])]
    return quad / (total * np.trace(k)), np.cumsum(modes) / total


def check(result: object, f: np.ndarray, weights: tuple[np.ndarray, ...], kind: str,
          targets: np.ndarray, per_layer: bool, tol: float,
          names: tuple[str, str] = ("0", "2")) -> None:
    """``names``: the hidden and the output layer's names as the backend reports them."""
    assert isinstance(result, cvcore.Measurement)
    dyn = result.dynamics
    layer_ks = kernels(jacobians(*weights), kind)
    k = layer_ks[0] + layer_ks[1]
    y = np.eye(O)[targets] if targets.ndim == 1 else targets
    quad, fractions = residual_reference(k, f - y, kind)
    assert rel_error(dyn.target_alignment, alignment(k, y, kind)) < tol
    assert rel_error(dyn.residual_alignment, quad) < tol
    assert rel_error(dyn.residual_fractions, fractions) < tol
    assert rel_error(dyn.residual_norm, np.linalg.norm(f - y)) < tol
    top = np.sort(np.linalg.eigvalsh(k))[::-1][:10]
    assert rel_error(dyn.top_eigenvalues, top) < tol
    assert dyn.convention.startswith(kind)
    variables = result.variables.model if per_layer else result.variables
    assert rel_error(variables.trace, np.trace(k)) < tol
    if per_layer:
        got = {la.layer: la.target_alignment for la in dyn.layers}
        assert sorted(got) == sorted(names)
        for name, lk in zip(names, layer_ks):
            assert rel_error(got[name], alignment(lk, y, kind)) < tol
    else:
        assert dyn.layers == ()


# --------------------------------------------------------------------------- models


def torch_model():
    torch = pytest.importorskip("torch")
    w1, b1, w2, b2 = WEIGHTS
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, WIDTH), torch.nn.Tanh(),
                                torch.nn.Linear(WIDTH, O)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(w1.T))
        model[0].bias.copy_(torch.from_numpy(b1))
        model[2].weight.copy_(torch.from_numpy(w2.T))
        model[2].bias.copy_(torch.from_numpy(b2))
    x = torch.from_numpy(X)
    return model, x, model(x).detach().numpy()


def jax_model():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    w1, b1, w2, b2 = WEIGHTS
    params = {"hidden": {"w": jnp.asarray(w1), "b": jnp.asarray(b1)},
              "head": {"w": jnp.asarray(w2), "b": jnp.asarray(b2)}}

    def apply_fn(p, x):
        return jnp.tanh(x @ p["hidden"]["w"] + p["hidden"]["b"]) @ p["head"]["w"] + p["head"]["b"]

    f = np.asarray(jax.jit(apply_fn)(params, jnp.asarray(X)))  # float32 unless x64 is on
    # the weights as JAX stores them (float32 by default) are the model's weights
    stored = tuple(np.asarray(a, dtype=np.float64) for a in
                   (params["hidden"]["w"], params["hidden"]["b"], params["head"]["w"], params["head"]["b"]))
    return (apply_fn, params), X, f, stored


def keras_model():
    keras = pytest.importorskip("keras")
    w1, b1, w2, b2 = WEIGHTS
    model = keras.Sequential([keras.Input((D_IN,), dtype="float64"),
                              keras.layers.Dense(WIDTH, activation="tanh", dtype="float64",
                                                 name="hidden"),
                              keras.layers.Dense(O, dtype="float64", name="head")])
    model.layers[0].set_weights([w1, b1])
    model.layers[1].set_weights([w2, b2])
    return model, X, np.asarray(keras.ops.convert_to_numpy(model(X)), dtype=np.float64)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", ["traced", "full"])
def test_torch_measure_with_targets(kind):
    model, x, f = torch_model()
    result = cvcore.measure(model, x, targets=LABELS, dtype="float64", kernel=kind)
    check(result, f, WEIGHTS, kind, LABELS, per_layer=False, tol=1e-9)
    per = cvcore.measure(model, x, targets=LABELS, dtype="float64", kernel=kind, per_layer=True)
    check(per, f, WEIGHTS, kind, LABELS, per_layer=True, tol=1e-9)
    assert [la.layer for la in per.dynamics.layers] == ["0", "2"]


def test_torch_regression_targets_and_unchanged_without():
    torch = pytest.importorskip("torch")
    model, x, f = torch_model()
    values = RNG.normal(size=(N, O))
    result = cvcore.measure(model, x, targets=torch.from_numpy(values), dtype="float64")
    check(result, f, WEIGHTS, "traced", values, per_layer=False, tol=1e-9)
    plain = cvcore.measure(model, x, dtype="float64")
    assert isinstance(plain, cvcore.CollectiveVariables)
    assert plain.to_dict() == result.variables.to_dict()  # the same variables, with or without
    trace_only = cvcore.measure(model, x, targets=LABELS, dtype="float64", variables="trace")
    assert math.isnan(trace_only.variables.covariance_entropy)  # not asked for
    assert trace_only.variables.eigenvalues.shape == (N,)  # the kernel was formed all the same
    check(trace_only, f, WEIGHTS, "traced", LABELS, per_layer=False, tol=1e-9)
    with pytest.raises(InputError, match="one target per probe sample \\(10\\), got 9"):
        cvcore.measure(model, x, targets=LABELS[:9])
    with pytest.raises(InputError, match="labels below 3"):
        cvcore.measure(model, x, targets=np.arange(N))


@pytest.mark.parametrize("kind", ["traced", "full"])
def test_jax_measure_with_targets(kind):
    model, x, f, stored = jax_model()
    result = cvcore.measure(model, x, targets=LABELS, dtype="float64", kernel=kind,
                            per_layer=kind == "full")
    # f(x) from the framework in float32 against cvcore's float64 outputs: 1e-6
    check(result, f, stored, kind, LABELS, per_layer=kind == "full", tol=1e-5,
          names=("hidden", "head"))


def test_keras_measure_with_targets():
    model, x, f = keras_model()
    result = cvcore.measure(model, x, targets=LABELS, dtype="float64", per_layer=True)
    check(result, f, WEIGHTS, "traced", LABELS, per_layer=True, tol=1e-9,
          names=("hidden", "head"))
    full = cvcore.measure(model, x, targets=LABELS, dtype="float64", kernel="full")
    check(full, f, WEIGHTS, "full", LABELS, per_layer=False, tol=1e-9)


def test_torch_outputs_follow_the_kernel():
    """The outputs capability selects the kernel's output, falls back to one sample at a
    time where vmap refuses the forward, and runs the whole batch under train=True."""
    torch = pytest.importorskip("torch")
    from cvcore.backends.torch.backend import TorchBackend

    from cvcore.protocols import KernelRequest

    model, x, f = torch_model()

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, inp):
            out = self.net(inp)
            return out, out.sum(1)

    class Branchy(torch.nn.Module):  # data-dependent Python control flow: vmap refuses it
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, inp):
            out = self.net(inp)
            return out * 2.0 if float(out.sum()) > 1e9 else out

    backend, req = TorchBackend(), KernelRequest(dtype="float64")

    got = backend.outputs(Two(), x, dataclasses.replace(req, output=0))
    assert rel_error(got, f) < 1e-14
    got = backend.outputs(Two(), x, dataclasses.replace(req, output=1))
    assert got.shape == (N, 1) and rel_error(got[:, 0], f.sum(1)) < 1e-14
    assert rel_error(backend.outputs(Branchy(), x, req), f) < 1e-14
    m = cvcore.measure(Two(), x, output=0, targets=LABELS, dtype="float64")
    assert rel_error(m.dynamics.residual_norm, np.linalg.norm(f - np.eye(O)[LABELS])) < 1e-12

    bn = torch.nn.Sequential(torch.nn.Linear(D_IN, 5), torch.nn.BatchNorm1d(5)).double()
    import copy

    with torch.no_grad():
        bn[1].running_mean.fill_(0.3)
        alone = bn.eval()(x).numpy()
        batch = copy.deepcopy(bn).train()(x).numpy()  # batch statistics
    assert rel_error(backend.outputs(bn, x, req), alone) < 1e-14
    assert rel_error(backend.outputs(bn, x, dataclasses.replace(req, train=True)), batch) < 1e-14
    assert not bn.training  # the model's mode is put back, its statistics untouched
    assert float(bn[1].running_mean.min()) == float(bn[1].running_mean.max()) == 0.3
