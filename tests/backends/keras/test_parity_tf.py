"""The same networks in PyTorch and Keras, with identical weights, give the same kernel and
the same collective variables through their two backends."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

if keras.backend.backend() != "tensorflow":  # pragma: no cover - KERAS_BACKEND set outside
    pytest.skip("these tests run Keras on the tensorflow backend in-process", allow_module_level=True)

import cvcore
from tests.tolerance import rel_error as rel

N = 6
EPS = 1e-5  # torch's LayerNorm default; Keras' is 1e-3, so it is set explicitly


def linear_to_dense(linear: torch.nn.Linear, dense: keras.layers.Dense) -> None:
    dense.set_weights([linear.weight.detach().numpy().T, linear.bias.detach().numpy()])


def conv_to_conv(conv: torch.nn.Conv2d, layer: keras.layers.Conv2D) -> None:
    kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
    layer.set_weights([kernel, conv.bias.detach().numpy()])


def norm_to_norm(norm: torch.nn.LayerNorm, layer: keras.layers.LayerNormalization) -> None:
    layer.set_weights([norm.weight.detach().numpy(), norm.bias.detach().numpy()])


def mlp_pair() -> tuple[torch.nn.Module, keras.Model, np.ndarray, np.ndarray]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 9),
                              torch.nn.Tanh(), torch.nn.Linear(9, 4))
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(9, activation="tanh"),
                              keras.layers.Dense(9, activation="tanh"), keras.layers.Dense(4)])
    for linear, dense in zip(net[::2], model.layers):
        linear_to_dense(linear, dense)
    x = np.random.default_rng(0).normal(size=(N, 6)).astype(np.float32)
    return net, model, x, x


def cnn_pair() -> tuple[torch.nn.Module, keras.Model, np.ndarray, np.ndarray]:
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Tanh(), torch.nn.Conv2d(4, 3, 3),
                              torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(3 * 3 * 3, 5))
    model = keras.Sequential([
        keras.Input((7, 7, 2)),
        keras.layers.Conv2D(4, 3, activation="tanh"),
        keras.layers.Conv2D(3, 3, activation="tanh"),
        keras.layers.Permute((3, 1, 2)),  # NHWC -> NCHW so Flatten orders like torch
        keras.layers.Flatten(),
        keras.layers.Dense(5),
    ])
    conv_to_conv(net[0], model.layers[0])
    conv_to_conv(net[2], model.layers[1])
    linear_to_dense(net[5], model.layers[4])
    x_nchw = np.random.default_rng(1).normal(size=(N, 2, 7, 7)).astype(np.float32)
    return net, model, x_nchw, x_nchw.transpose(0, 2, 3, 1)


def layernorm_pair() -> tuple[torch.nn.Module, keras.Model, np.ndarray, np.ndarray]:
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.LayerNorm(8, eps=EPS),
                              torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with torch.no_grad():  # move the affine part away from its trivial initial values
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    model = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(8), keras.layers.LayerNormalization(epsilon=EPS),
        # tanh, not GELU: Keras' exact GELU is off by ~5e-9 in float64 on TensorFlow
        keras.layers.Activation("tanh"),
        keras.layers.Dense(3),
    ])
    linear_to_dense(net[0], model.layers[0])
    norm_to_norm(net[1], model.layers[1])
    linear_to_dense(net[3], model.layers[3])
    x = np.random.default_rng(2).normal(size=(N, 5)).astype(np.float32)
    return net, model, x, x


PAIRS = {"mlp": mlp_pair, "cnn": cnn_pair, "layernorm": layernorm_pair}


@pytest.fixture(scope="module", params=list(PAIRS))
def pair(request):
    return PAIRS[request.param]()


def test_same_forward(pair):
    net, model, x_torch, x_keras = pair
    with torch.no_grad():
        expected = net(torch.from_numpy(x_torch)).numpy()
    assert np.abs(np.asarray(model(x_keras)) - expected).max() < 1e-5


@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("kind", ["traced", "full"])
def test_same_kernel(pair, kind, dtype, tol):
    net, model, x_torch, x_keras = pair
    k_torch = cvcore.ntk(net, x_torch, kernel=kind, dtype=dtype)
    k_keras = cvcore.ntk(model, x_keras, kernel=kind, dtype=dtype)
    assert k_keras.dtype == np.dtype(dtype) and k_keras.shape == k_torch.shape
    assert np.abs(k_torch).max() > 0.1
    assert rel(k_keras, k_torch) < tol


def test_same_collective_variables(pair):
    net, model, x_torch, x_keras = pair
    a = cvcore.measure(net, x_torch, dtype="float64")
    b = cvcore.measure(model, x_keras, dtype="float64")
    assert b.trace == pytest.approx(a.trace, rel=1e-10)
    assert b.entropy == pytest.approx(a.entropy, rel=1e-8)
    np.testing.assert_allclose(b.eigenvalues, a.eigenvalues, rtol=1e-8, atol=1e-10 * a.trace)
