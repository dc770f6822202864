"""Parity: the same networks in PyTorch and JAX, with identical weights, give one kernel.

Weights are copied from the torch model into the JAX parameters: a ``Linear`` weight is
(out, in) in torch and (in, out) in flax; a ``Conv2d`` weight is (out, in, kh, kw) in
torch and (kh, kw, in, out) in flax, whose images are NHWC where torch's are NCHW.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
flax = pytest.importorskip("flax")
eqx = pytest.importorskip("equinox")
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

import cvcore
from tests.tolerance import rel_error as rel

TOLERANCES = {"float64": 1e-10, "float32": 1e-4}


def t2n(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def dense(linear: Any) -> dict[str, np.ndarray]:
    return {"kernel": t2n(linear.weight).T, "bias": t2n(linear.bias)}


# --------------------------------------------------------------------------- MLP


def torch_mlp() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        return nn.Dense(3, name="out")(jnp.tanh(nn.Dense(8, name="hidden")(x)))


def mlp_pair(tm: Any) -> tuple[Any, Any, Callable[[np.ndarray], np.ndarray]]:
    params = {"hidden": dense(tm[0]), "out": dense(tm[2])}
    return (LinenMLP(), {"params": params}), None, lambda x: x  # type: ignore[return-value]


def mlp_equinox(tm: Any) -> tuple[Any, Any, Callable[[np.ndarray], np.ndarray]]:
    model = eqx.nn.MLP(5, 3, 8, depth=1, activation=jnp.tanh, key=jax.random.key(0))
    for i, layer in ((0, tm[0]), (1, tm[2])):  # equinox keeps torch's (out, in) layout
        model = eqx.tree_at(lambda m, i=i: (m.layers[i].weight, m.layers[i].bias), model,
                            (jnp.asarray(t2n(layer.weight)), jnp.asarray(t2n(layer.bias))))
    return model, None, lambda x: x  # type: ignore[return-value]


# --------------------------------------------------------------------------- CNN


class TorchCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: Any) -> Any:
        x = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.fc(x.flatten(1))


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:  # x: NHWC
        x = jnp.tanh(nn.Conv(3, (3, 3), padding=((1, 1), (1, 1)), name="c1")(x))
        x = jnp.tanh(nn.Conv(4, (3, 3), padding="VALID", name="c2")(x))
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # flatten as torch: C, H, W
        return nn.Dense(3, name="fc")(x)


def conv(layer: Any) -> dict[str, np.ndarray]:
    return {"kernel": t2n(layer.weight).transpose(2, 3, 1, 0), "bias": t2n(layer.bias)}


def torch_cnn() -> Any:
    torch.manual_seed(1)
    return TorchCNN()


def cnn_linen(tm: Any) -> tuple[Any, Any, Callable[[np.ndarray], np.ndarray]]:
    params = {"c1": conv(tm.c1), "c2": conv(tm.c2), "fc": dense(tm.fc)}
    return (LinenCNN(), {"params": params}), None, lambda x: x.transpose(0, 2, 3, 1)  # type: ignore[return-value]


# --------------------------------------------------------------------------- LayerNorm


def torch_layernorm() -> Any:
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3))
    with torch.no_grad():  # LayerNorm's affine parameters away from (1, 0)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model


class NnxLayerNorm(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(5, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, epsilon=1e-5, use_fast_variance=False, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        return self.l2(jnp.tanh(self.norm(self.l1(x))))


def layernorm_nnx(tm: Any) -> tuple[Any, Any, Callable[[np.ndarray], np.ndarray]]:
    model = NnxLayerNorm(nnx.Rngs(0))
    for mine, theirs in ((model.l1, tm[0]), (model.l2, tm[3])):
        mine.kernel[...] = jnp.asarray(t2n(theirs.weight).T)
        mine.bias[...] = jnp.asarray(t2n(theirs.bias))
    model.norm.scale[...] = jnp.asarray(t2n(tm[1].weight))
    model.norm.bias[...] = jnp.asarray(t2n(tm[1].bias))
    return model, None, lambda x: x  # type: ignore[return-value]


def layernorm_pair(tm: Any) -> tuple[Any, Any, Callable[[np.ndarray], np.ndarray]]:
    params = {"l1": dense(tm[0]), "ln": {"scale": t2n(tm[1].weight), "bias": t2n(tm[1].bias)},
              "l2": dense(tm[3])}

    def apply(p: Any, x: Any) -> Any:  # plain jax, written out
        h = x @ p["l1"]["kernel"] + p["l1"]["bias"]
        mu = h.mean(-1, keepdims=True)
        var = ((h - mu) ** 2).mean(-1, keepdims=True)
        h = (h - mu) / jnp.sqrt(var + 1e-5) * p["ln"]["scale"] + p["ln"]["bias"]
        return jnp.tanh(h) @ p["l2"]["kernel"] + p["l2"]["bias"]

    return (apply, jax.tree_util.tree_map(jnp.asarray, params)), None, lambda x: x  # type: ignore[return-value]


CASES = {
    "mlp-linen": (torch_mlp, mlp_pair, (7, 5)),
    "mlp-equinox": (torch_mlp, mlp_equinox, (7, 5)),
    "cnn-linen": (torch_cnn, cnn_linen, (6, 2, 6, 6)),
    "layernorm-nnx": (torch_layernorm, layernorm_nnx, (7, 5)),
    "layernorm-apply_fn": (torch_layernorm, layernorm_pair, (7, 5)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request: Any) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    make_torch, make_jax, shape = CASES[request.param]
    tm = make_torch()
    jm, _, layout = make_jax(tm)
    x = np.random.default_rng(3).normal(size=shape)
    return tm, jm, x, layout(x)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kernel", ["traced", "full"])
def test_torch_and_jax_kernels_agree(case: Any, kernel: str, dtype: str) -> None:
    tm, jm, x_torch, x_jax = case
    kt = cvcore.ntk(tm, x_torch, kernel=kernel, dtype=dtype)
    kj = cvcore.ntk(jm, x_jax, kernel=kernel, dtype=dtype)
    assert kt.shape == kj.shape == ((7 if x_torch.shape[0] == 7 else 6) * (3 if kernel == "full" else 1),) * 2
    assert kt.dtype == kj.dtype == np.dtype(dtype)
    assert rel(kj, kt) < TOLERANCES[dtype]


def test_collective_variables_agree(case: Any) -> None:
    tm, jm, x_torch, x_jax = case
    for dtype in ("float64", "float32"):
        ct = cvcore.measure(tm, x_torch, dtype=dtype)
        cj = cvcore.measure(jm, x_jax, dtype=dtype)
        tol = TOLERANCES[dtype] * 10
        for name in ("trace", "normalized_trace", "entropy", "effective_rank", "self_entropy",
                     "covariance_entropy"):
            assert getattr(cj, name) == pytest.approx(getattr(ct, name), rel=tol), name
        assert rel(cj.eigenvalues, ct.eigenvalues) < tol


def test_parity_detects_a_wrong_weight_copy() -> None:
    tm = torch_mlp()
    (module, variables), _, _ = mlp_pair(tm)
    wrong = {"params": {**variables["params"], "hidden": {
        "kernel": t2n(tm[0].weight).reshape(5, 8), "bias": variables["params"]["hidden"]["bias"]}}}
    x = np.random.default_rng(3).normal(size=(7, 5))
    assert rel(cvcore.ntk((module, wrong), x, dtype="float64"), cvcore.ntk(tm, x, dtype="float64")) > 1e-3
