"""One meaning, on every backend and implementation, for a forward that couples the
samples of a batch in eval mode: the kernel of each sample alone (docs/concepts.md)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cvcore
from tests.backends.torch.test_row_soundness import Centered, per_sample_kernel, rel

N = 9


@pytest.fixture(scope="module")
def centered() -> tuple[Any, np.ndarray, np.ndarray]:
    torch.manual_seed(7)
    model = Centered().double().eval()
    x = np.random.default_rng(7).normal(size=(N, 4))
    xt = torch.from_numpy(x)
    ref = per_sample_kernel(model, lambda i: model(xt[i:i + 1]), N)
    return model, x, ref


def weights(model: Any) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("impl", ["auto", "structured", "jacobian"])
def test_torch(centered: Any, impl: str) -> None:
    model, x, ref = centered
    assert rel(cvcore.ntk(model, x, dtype="float64", implementation=impl), ref) < 1e-9


@pytest.mark.parametrize("impl", ["auto", "structured", "jacobian"])
def test_jax(centered: Any, impl: str) -> None:
    pytest.importorskip("jax")
    import jax.numpy as jnp

    model, x, ref = centered
    w = weights(model)
    params = {"l1": {"w": jnp.asarray(w["l1.weight"].T), "b": jnp.asarray(w["l1.bias"])},
              "l2": {"w": jnp.asarray(w["l2.weight"].T), "b": jnp.asarray(w["l2.bias"])}}

    def apply(p: Any, xb: Any) -> Any:
        h = xb @ p["l1"]["w"] + p["l1"]["b"]
        return (jnp.tanh(h - h.mean(0)) + h) @ p["l2"]["w"] + p["l2"]["b"]

    k = cvcore.ntk((apply, params), x, dtype="float64", implementation=impl)
    assert rel(k, ref) < 1e-9


def test_keras(centered: Any) -> None:
    keras = pytest.importorskip("keras")

    class Center(keras.layers.Layer):
        def call(self, h: Any) -> Any:
            return keras.ops.tanh(h - keras.ops.mean(h, axis=0, keepdims=True)) + h

    model, x, ref = centered
    w = weights(model)
    inp = keras.Input((4,))
    h = keras.layers.Dense(6)(inp)
    net = keras.Model(inp, keras.layers.Dense(2)(Center()(h)))
    net.layers[1].set_weights([w["l1.weight"].T, w["l1.bias"]])
    net.layers[3].set_weights([w["l2.weight"].T, w["l2.bias"]])
    k = cvcore.ntk(net, x.astype(np.float32))
    assert rel(k, ref) < 1e-4
