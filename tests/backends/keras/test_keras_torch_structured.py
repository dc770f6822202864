"""Keras on torch through the torch backend's structured engine (backends/keras/structured.py
``torch_module``, backends/torch/views.py), in float64, against per-sample
``torch.autograd.grad`` loops of ``stateless_call`` and against the Jacobian path.

Keras' backend is fixed per process: the Keras models run in one subprocess with
``KERAS_BACKEND=torch``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.tolerance import rel_error as rel

torch = pytest.importorskip("torch")
pytest.importorskip("keras")

SCRIPT = textwrap.dedent("""
    import json
    import keras
    import numpy as np
    import torch
    from keras import layers as L

    import cvcore
    from cvcore.backends.keras.backend import KerasBackend
    from cvcore.backends.keras.setup import keras_float64
    from cvcore.protocols import Implementation, KernelRequest

    keras.config.set_floatx("float64")
    rng = np.random.default_rng(0)


    class Twice(L.Layer):
        # one square weight read as x @ w and as x @ w.T: two layouts, no rule for w
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], shape[-1]), initializer="glorot_uniform")

        def call(self, x):
            return keras.ops.matmul(x, self.w) + keras.ops.matmul(x, keras.ops.transpose(self.w))


    def models():
        keras.utils.set_random_seed(0)
        mlp = keras.Sequential([keras.Input((6,)), L.Dense(16, activation="tanh"), L.Dense(3)])
        conv = keras.Sequential([
            keras.Input((7, 7, 2)), L.Conv2D(4, 3, padding="same", activation="tanh"),
            L.DepthwiseConv2D(3, depth_multiplier=2), L.BatchNormalization(),
            L.Activation("tanh"), L.Flatten(), L.Dense(3)])
        bn = conv.layers[2]
        bn.moving_mean.assign(rng.normal(size=bn.moving_mean.shape))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=bn.moving_variance.shape))
        bn.gamma.assign(rng.normal(size=bn.gamma.shape))
        bn.beta.assign(rng.normal(size=bn.beta.shape))
        emb = keras.Sequential([keras.Input((5,), dtype="int32"), L.Embedding(11, 6),
                                L.LayerNormalization(), L.Flatten(), L.Dense(3)])
        emb.layers[1].gamma.assign(rng.normal(size=(6,)))
        twice = keras.Sequential([keras.Input((4,)), L.Dense(4, activation="tanh"), Twice(),
                                  L.Dense(2)])
        return {
            "mlp": (mlp, rng.normal(size=(5, 6))),
            "conv": (conv, rng.normal(size=(4, 7, 7, 2))),
            "embedding": (emb, rng.integers(0, 11, size=(5, 5)).astype("int32")),
            "twice": (twice, rng.normal(size=(5, 4))),
        }


    def reference(model, x):
        # per-sample torch.autograd.grad of stateless_call, one output at a time
        theta = [v.value.detach().clone().requires_grad_(True) for v in model.trainable_variables]
        fixed = [v.value.detach() for v in model.non_trainable_variables]
        rows = []
        with keras_float64("torch", True):
            for i in range(len(x)):
                out, _ = model.stateless_call(theta, fixed, torch.as_tensor(x[i:i + 1]))
                out = out.reshape(-1)
                rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
                    out[o], theta, retain_graph=True)]) for o in range(out.numel())]))
        j = torch.stack(rows).double().numpy()
        n, o, _ = j.shape
        return {"traced": np.einsum("iop,jop->ij", j, j) / o,
                "full": np.einsum("iop,jqp->iojq", j, j).reshape(n * o, n * o)}


    result = {}
    for name, (model, x) in models().items():
        ref = reference(model, x)
        got = {"ref_" + k: v.tolist() for k, v in ref.items()}
        for impl in ("structured", "auto", "jacobian"):
            for kind in ("traced", "full"):
                r = KerasBackend().ntk(model, x, KernelRequest(
                    kernel=kind, dtype="float64", implementation=Implementation(impl)))
                got[impl + kind] = r.kernel.tolist()
                got["rules_" + impl + kind] = dict(r.rules)
        got["api"] = np.asarray(cvcore.ntk(model, x, dtype="float64")).tolist()
        got["diagonal"] = KerasBackend().diagonal(model, x, KernelRequest(dtype="float64")).tolist()
        got["trace"] = cvcore.measure(model, x, dtype="float64", variables=["trace"]).trace
        got["paths"] = [v.path for v in model.trainable_variables]
        result[name] = got
    print(json.dumps(result))
""")


@pytest.fixture(scope="module")
def runs() -> dict:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          check=False, timeout=600, env={**os.environ, "KERAS_BACKEND": "torch"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["mlp", "conv", "embedding", "twice"])
@pytest.mark.slow
def test_every_route_matches_per_sample_gradients(runs, name):
    got = runs[name]
    for impl in ("structured", "auto", "jacobian"):
        for kind in ("traced", "full"):
            assert rel(got[impl + kind], got["ref_" + kind]) < 1e-10, (impl, kind)
    assert rel(got["api"], got["ref_traced"]) < 1e-10
    assert rel(got["diagonal"], np.diag(got["ref_traced"])) < 1e-10
    assert abs(got["trace"] / np.trace(got["ref_traced"]) - 1) < 1e-10


def _rules(got: dict, impl: str = "structured") -> dict[str, str]:
    rules = got["rules_" + impl + "traced"]
    assert rules == got["rules_" + impl + "full"]
    return {k.split("/", 1)[1]: v for k, v in rules.items()}  # the model's name left off


@pytest.mark.slow
def test_dense_and_convolution_weights_are_served_by_rules(runs):
    """No silent Jacobian fallback: every Dense / Conv2D / DepthwiseConv2D kernel and bias,
    Embedding, LayerNormalization and BatchNormalization weight has a rule (batch
    normalization is ``x.subtract(mean).mul_(rsqrt(var + eps) * gamma).add_(beta)`` in
    Keras' torch backend: a scaled view of ``gamma``, two in-place direct uses)."""
    assert _rules(runs["mlp"]) == {"dense/kernel": "matmul (dense)", "dense/bias": "add (direct)",
                                   "dense_1/kernel": "matmul (dense)",
                                   "dense_1/bias": "add (direct)"}
    conv = _rules(runs["conv"])
    assert conv["conv2d/kernel"] == conv["depthwise_conv2d/kernel"] == "conv2d (dense)"
    assert conv["conv2d/bias"] == conv["depthwise_conv2d/bias"] == "add (direct)"
    assert conv["dense_2/kernel"] == "matmul (dense)"
    assert conv["batch_normalization/gamma"] == "mul_ (direct)"
    assert conv["batch_normalization/beta"] == "add_ (direct)"
    assert len(conv) == len(runs["conv"]["paths"])
    assert _rules(runs["embedding"]) == {
        "embedding/embeddings": "embedding (embedding)",
        "layer_normalization/gamma": "layer_norm (direct)",
        "layer_normalization/beta": "layer_norm (direct)",
        "dense_3/kernel": "matmul (dense)", "dense_3/bias": "add (direct)"}
    assert _rules(runs["mlp"], "auto") == _rules(runs["mlp"])  # auto takes the rules too
    assert _rules(runs["embedding"], "auto") == _rules(runs["embedding"])
    assert _rules(runs["conv"], "auto") == {}  # convolutions: vmap(jacrev), measured cheaper
    assert _rules(runs["mlp"], "jacobian") == {}


@pytest.mark.slow
def test_a_weight_read_in_two_layouts_goes_to_the_jacobian_path(runs):
    rules = _rules(runs["twice"])
    assert not any(k.startswith("twice/") for k in rules)
    assert {"dense_4/kernel", "dense_5/kernel"} <= set(rules)


def test_an_output_changed_in_place_loses_its_rule():
    """``nn.ReLU(inplace=True)`` after a linear layer overwrites the recorded output: the
    layer goes to the Jacobian path (before, the structured kernel was off by 3.0 here)."""
    import cvcore

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(inplace=True),
                                torch.nn.Linear(8, 3))
    x = torch.randn(6, 4)
    structured = np.asarray(cvcore.ntk(model, x, implementation="structured", dtype="float64"))
    jacobian = np.asarray(cvcore.ntk(model, x, implementation="jacobian", dtype="float64"))
    assert rel(structured, jacobian) < 1e-12


class _Scaled(torch.nn.Module):
    """``w * 2`` handed to ``F.linear`` (a scaled view given to a rule that does not apply
    factors), then ``h * s + b`` and ``h.mul_(c).add_(d)`` (direct uses)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(5, 4, generator=g))
        self.s = torch.nn.Parameter(torch.randn(5, generator=g))
        self.b = torch.nn.Parameter(torch.randn(5, generator=g))
        self.c = torch.nn.Parameter(torch.randn(1, 5, generator=g))
        self.d = torch.nn.Parameter(torch.randn(5, generator=g))
        self.v = torch.nn.Parameter(torch.randn(3, 5, generator=g))

    def forward(self, x):
        h = torch.nn.functional.linear(x, self.w * 2.0)
        h = torch.tanh(h * self.s + self.b)
        h = (h - 0.5).mul_(torch.full((1, 5), 3.0).mul(self.c)).add_(self.d)
        return torch.nn.functional.linear(torch.tanh(h), self.v)


def test_scaled_views_and_direct_products_on_torch():
    from cvcore.backends.torch.backend import TorchBackend

    from cvcore.protocols import Implementation, KernelRequest

    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    model = _Scaled()
    for kind in ("traced", "full"):
        got = TorchBackend().ntk(model, x, KernelRequest(kernel=kind, dtype="float64",
                                                         implementation=Implementation.STRUCTURED))
        ref = TorchBackend().ntk(model, x, KernelRequest(kernel=kind, dtype="float64",
                                                         implementation=Implementation.JACOBIAN))
        assert rel(got.kernel, ref.kernel) < 1e-12
        assert got.rules == {"s": "mul (direct)", "b": "add (direct)", "c": "mul_ (direct)",
                             "d": "add_ (direct)", "v": "linear (dense)"}
