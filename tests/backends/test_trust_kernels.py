"""Kernels that must not be silently wrong: bias folds, complex numbers, per-layer rows.

1. The JAX structured engine folds a bias into its layer's rule only when the layer's
   pre-bias output is read by the bias add alone; every kernel here is compared, in
   float64, with one built from per-sample ``jax.jacrev`` Jacobians.
2. Complex parameters (and complex outputs) are refused in one line on every backend.
3. Per-layer rows have one name rule on every backend and adapter: the layer's module
   path in the user's model, ``.``-joined, one row per layer.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

import cvcore
from cvcore.api import build, make_request
from cvcore.errors import ModelError
from tests.tolerance import rel_error as rel

N = 5


def traced_from_full(full: np.ndarray, n: int) -> np.ndarray:
    o = full.shape[0] // n
    return full.reshape(n, o, n, o).trace(axis1=1, axis2=3) / o


# =========================================================================== 1. bias folds
jax = pytest.importorskip("jax")
jnp = jax.numpy
from cvcore.backends.jax import jaxpr as jx
from cvcore.backends.jax import setup as jb
from cvcore.backends.jax import sites as jr
from cvcore.backends.jax.backend import JaxBackend


def jacobian_reference(fn: Any, params: Any, x: np.ndarray, output: Any = None,
                       only: str | None = None) -> np.ndarray:
    """Full kernel ``J Jᵀ`` from per-sample ``jax.jacrev`` in float64 (rows ``i·O + o``);
    ``only``: the leaves under that top-level key alone (a per-layer row)."""
    with jb.x64_scope(True):
        p = jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float64), params)
        xs = jnp.asarray(x, jnp.float64)

        def single(q: Any, xi: Any) -> Any:
            raw = fn(q, xi[None])
            out = raw if output is None else raw[output]
            return out.reshape(-1)

        rows = []
        for i in range(len(x)):
            jac = jax.jacrev(single)(p, xs[i])
            if only is not None:
                jac = jac[only]
            leaves = jax.tree_util.tree_leaves(jac)
            rows.append(np.concatenate([np.asarray(j).reshape(j.shape[0], -1)
                                        for j in leaves], axis=1))
    j = np.concatenate(rows)
    return j @ j.T


def _dotted(keystr: str) -> str:
    """``['dense']['W']`` → ``dense.W``."""
    return ".".join(re.findall(r"\w+", keystr))


def analysis_of(fn: Any, params: Any, x: np.ndarray, output: Any = None
                ) -> tuple[dict[str, list[str]], set[str], dict[str, str]]:
    """Site kinds per ruled leaf, directly measured leaves and folded biases, by name."""
    device = jax.devices("cpu")[0]
    with jb.x64_scope(True), jax.default_device(device):
        prep = jb.prepare_model((fn, params), train=False)
        prep.params = jb.cast_tree(prep.params, jnp.float64, device)
        leaves = jb.flatten_params(prep.params)
        xs = jb.as_inputs(x, jnp.float64, device)
        jx.probe_outputs(prep, leaves, xs, output)
        analysis = jr.analyse(jx.trace(prep, leaves, xs, output).jaxpr, len(leaves.trainable))
    names = [_dotted(leaves.paths[i]) for i in leaves.trainable]
    kinds: dict[str, list[str]] = {}
    for site in analysis.sites:
        kinds.setdefault(names[site.leaf], []).append(site.kind)
    return (kinds, {names[i] for i in analysis.direct},
            {names[w]: names[b] for w, b in analysis.bias.items()})


def dense_params(seed: int = 0, d_in: int = 4, d_out: int = 3) -> dict[str, Any]:
    k = jax.random.split(jax.random.key(seed), 4)
    return {"dense": {"W": np.asarray(jax.random.normal(k[0], (d_in, d_out))) / 2,
                      "b": np.asarray(jax.random.normal(k[1], (d_out,)))},
            "head": {"W": np.asarray(jax.random.normal(k[2], (d_out, 2))) / 2,
                     "b": np.asarray(jax.random.normal(k[3], (2,)))}}


def reproducer(p: Any, x: Any) -> Any:
    """The pre-bias value ``x @ W`` read again after the bias add."""
    z = x @ p["dense"]["W"]
    return jnp.tanh(z + p["dense"]["b"]) + z


def add_used_twice(p: Any, x: Any) -> Any:
    """The bias add's *output* read twice: the fold stays exact."""
    y = x @ p["dense"]["W"] + p["dense"]["b"]
    return jnp.tanh(y) @ p["head"]["W"] + y[:, :2] ** 2 + p["head"]["b"]


def returns_pre_bias(p: Any, x: Any) -> Any:
    """``(tanh(z + b) @ V, z)``: the second output is the pre-bias value itself."""
    z = x @ p["dense"]["W"]
    return jnp.tanh(z + p["dense"]["b"]) @ p["head"]["W"], z


def nested_jit_use(p: Any, x: Any) -> Any:
    """The pre-bias value passed to a nested ``jit``."""
    z = x @ p["dense"]["W"]
    return jnp.tanh(z + p["dense"]["b"]) + jax.jit(jnp.sin)(z)


@jax.jit
def _layer(w: Any, b: Any, x: Any) -> tuple[Any, Any]:
    z = x @ w
    return z + b, z


def nested_jit_output(p: Any, x: Any) -> Any:
    """The dense layer inside a nested ``jit`` that also returns its pre-bias value."""
    y, z = _layer(p["dense"]["W"], p["dense"]["b"], x)
    return jnp.tanh(y) * z


def conv_reused(p: Any, x: Any) -> Any:
    """A convolution whose pre-bias output is read again after the bias add."""
    z = jax.lax.conv_general_dilated(x, p["dense"]["W"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(z + p["dense"]["b"]) + 0.5 * z
    return h.mean(axis=(1, 2))


def conv_params() -> dict[str, Any]:
    k = jax.random.split(jax.random.key(7), 2)
    return {"dense": {"W": np.asarray(jax.random.normal(k[0], (2, 2, 2, 3))) / 2,
                      "b": np.asarray(jax.random.normal(k[1], (3,)))}}


def _x(*shape: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(N, *shape))


#: name -> (apply_fn, params, inputs, output selector, whether dense.b may be folded)
FOLD_CASES: dict[str, tuple[Any, Any, np.ndarray, Any, bool]] = {
    "reproducer": (reproducer, {"dense": dense_params()["dense"]}, _x(4), None, False),
    "add_used_twice": (add_used_twice, dense_params(1), _x(4), None, True),
    "returns_pre_bias_second": (returns_pre_bias, dense_params(2), _x(4), 1, False),
    # the second output dropped by output=0: z is read by the bias add alone
    "returns_pre_bias_first": (returns_pre_bias, dense_params(2), _x(4), 0, True),
    "nested_jit_use": (nested_jit_use, {"dense": dense_params(3)["dense"]}, _x(4), None, False),
    "nested_jit_output": (nested_jit_output, {"dense": dense_params(4)["dense"]}, _x(4), None,
                          False),
    "conv_reused": (conv_reused, conv_params(), _x(4, 4, 2), None, False),
}


@pytest.mark.parametrize("name", list(FOLD_CASES))
@pytest.mark.parametrize("implementation", ["auto", "structured"])
def test_bias_fold_needs_the_pre_bias_value_read_once(name: str, implementation: str) -> None:
    fn, params, x, output, foldable = FOLD_CASES[name]
    reference = jacobian_reference(fn, params, x, output)
    full = cvcore.ntk((fn, params), x, kernel="full", dtype="float64", output=output,
                      implementation=implementation)
    traced = cvcore.ntk((fn, params), x, dtype="float64", output=output,
                        implementation=implementation)
    assert rel(full, reference) < 1e-10
    assert rel(traced, traced_from_full(reference, N)) < 1e-10
    kinds, direct, folded = analysis_of(fn, params, x, output)
    assert kinds["dense.W"] == ["conv" if name.startswith("conv") else "dense"]
    if foldable:
        assert folded.get("dense.W") == "dense.b"
    else:
        assert "dense.W" not in folded and "dense.b" in direct


def test_bias_of_a_pre_bias_output_alone_contributes_nothing() -> None:
    """Only ``z = x @ W`` is measured: the bias cannot move it. A folded bias would add
    ``Σ g g`` (the ones column) to the kernel."""
    fn, params, x, _, _ = FOLD_CASES["returns_pre_bias_second"]
    only_bias = {"dense": {"b": params["dense"]["b"]}}

    def bias_only(q: Any, xi: Any) -> Any:
        return fn({"dense": {"W": params["dense"]["W"], "b": q["dense"]["b"]},
                   "head": params["head"]}, xi)

    assert np.abs(jacobian_reference(bias_only, only_bias, x, 1)).max() == 0
    split = JaxBackend().layer_kernels((fn, params), x, make_request(
        kernel="full", dtype="float64", output=1))
    rows = {layer.name: np.asarray(layer.kernel) for layer in split.layers}
    assert rel(rows["dense"], jacobian_reference(fn, params, x, 1, only="dense")) < 1e-10
    assert np.abs(rows["head"]).max() == 0


@pytest.mark.parametrize("kernel", ["full", "traced"])
def test_per_layer_rows_of_the_reproducer(kernel: str) -> None:
    params = dense_params(5)

    def fn(p: Any, x: Any) -> Any:
        return reproducer(p, x) @ p["head"]["W"] + p["head"]["b"]

    x = _x(4, seed=6)
    split = JaxBackend().layer_kernels((fn, params), x, make_request(
        kernel=kernel, dtype="float64"))
    assert [layer.name for layer in split.layers] == ["dense", "head"]
    for layer in split.layers:
        reference = jacobian_reference(fn, params, x, only=layer.name)
        expected = reference if kernel == "full" else traced_from_full(reference, N)
        assert rel(layer.kernel, expected) < 1e-10, layer.name


def test_a_plain_dense_layer_keeps_its_rule_and_its_bias() -> None:
    pytest.importorskip("flax")
    from flax import linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.Dense(2)(jnp.tanh(nn.Dense(6)(x)))

    x = _x(4, seed=8)
    module = MLP()
    variables = module.init(jax.random.key(0), jnp.asarray(x[:1]))
    _, direct, bias = analysis_of(module, variables, x)
    assert bias == {"Dense_0.kernel": "Dense_0.bias", "Dense_1.kernel": "Dense_1.bias"}
    assert direct == set()

    def apply(p: Any, xb: Any) -> Any:
        return module.apply({"params": p}, xb)

    reference = jacobian_reference(apply, variables["params"], x)
    k = cvcore.ntk((module, variables), x, kernel="full", dtype="float64")
    assert rel(k, reference) < 1e-10


# =========================================================================== 2. complex numbers
def test_jax_refuses_complex_parameters() -> None:
    params = {"l1": {"w": jnp.ones((3, 2), jnp.complex64) * (1 + 1j)}}
    x = _x(3)
    for implementation in ("auto", "jacobian"):
        with pytest.raises(ModelError) as info:
            cvcore.ntk((lambda p, xb: jnp.abs(xb @ p["l1"]["w"]), params), x,
                       implementation=implementation)
        assert str(info.value) == ("expected real floating-point parameters, got complex64 "
                                   "in 'l1.w'")


def test_jax_refuses_a_complex_output() -> None:
    params = {"w": np.ones((3, 2))}
    with pytest.raises(ModelError, match="expected a real floating-point output to "
                                         "differentiate, got complex"):
        cvcore.ntk((lambda p, xb: (xb @ p["w"]) * (1 + 1j), params), _x(3))


def test_jax_complex_intermediate_values_get_no_rule() -> None:
    """Real weights, complex inputs, a real output: the kernel is the real one, so the
    dense rule (a Gram matrix without conjugates) must not act on the complex product."""
    rng = np.random.default_rng(9)
    x = (rng.normal(size=(N, 3)) + 1j * rng.normal(size=(N, 3))).astype(np.complex128)
    params = {"w": rng.normal(size=(3, 2))}

    def fn(p: Any, xb: Any) -> Any:
        return jnp.abs(jnp.tanh(xb @ p["w"]))

    with jb.x64_scope(True):
        p64 = {"w": jnp.asarray(params["w"], jnp.float64)}
        rows = [jax.jacrev(lambda q, i=i: fn(q, jnp.asarray(x[i:i + 1])).reshape(-1))(p64)["w"]
                .reshape(2, -1) for i in range(N)]
    j = np.concatenate([np.asarray(r) for r in rows])
    for implementation in ("structured", "auto"):
        k = cvcore.ntk((fn, params), x, kernel="full", dtype="float64",
                       implementation=implementation)
        assert rel(k, j @ j.T) < 1e-10


def test_torch_refuses_complex_parameters() -> None:
    torch = pytest.importorskip("torch")

    class Complex(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)
            self.layer.weight = torch.nn.Parameter(self.layer.weight.detach().to(torch.complex64))
            self.layer.bias = torch.nn.Parameter(self.layer.bias.detach().to(torch.complex64))

        def forward(self, x: Any) -> Any:
            return self.layer(x.to(torch.complex64)).abs()

    x = _x(3).astype(np.float32)
    for implementation in ("auto", "jacobian"):
        with pytest.raises(ModelError) as info:
            cvcore.ntk(Complex(), x, implementation=implementation)
        assert str(info.value) == ("expected real floating-point parameters, got complex64 "
                                   "in 'layer.weight'")
    with pytest.raises(ModelError, match="got complex64 in 'layer.weight'"):
        cvcore.measure(Complex(), x, variables=["trace"])


def _keras() -> Any:
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the Keras tests here run on the TensorFlow backend")
    return keras


def test_keras_refuses_complex_variables_and_outputs() -> None:
    keras = _keras()

    class ComplexDense(keras.layers.Layer):
        def build(self, shape: Any) -> None:
            self.w = self.add_weight(shape=(shape[-1], 2), dtype="complex64",
                                     initializer="ones", name="w")

        def call(self, x: Any) -> Any:
            return keras.ops.abs(keras.ops.matmul(keras.ops.cast(x, "complex64"), self.w))

    model = keras.Sequential([keras.Input((3,)), ComplexDense(name="cd")], name="net")
    x = _x(3).astype(np.float32)
    with pytest.raises(ModelError) as info:
        cvcore.ntk(model, x)
    assert str(info.value) == ("expected real floating-point parameters, got complex64 in "
                               "'net/cd/w'")

    class ToComplex(keras.layers.Layer):
        def call(self, x: Any) -> Any:
            return keras.ops.cast(x, "complex64") * (1 + 1j)

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), ToComplex()])
    with pytest.raises(ModelError, match="expected a real floating-point output to "
                                         "differentiate, got complex64"):
        cvcore.ntk(model, x)


def test_tf_module_refuses_complex_variables() -> None:
    tf = pytest.importorskip("tensorflow")

    class Complex(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="cm")
            self.w = tf.Variable(tf.ones((3, 2), tf.complex64), name="w")

        def __call__(self, x: Any) -> Any:
            return tf.abs(tf.matmul(tf.cast(x, tf.complex64), self.w))

    with pytest.raises(ModelError, match="expected real floating-point parameters, got "
                                         "complex64 in 'w"):
        cvcore.ntk(Complex(), _x(3).astype(np.float32), backend="tensorflow")


# =========================================================================== 3. per-layer rows
def _split(model: Any, x: Any, **options: Any) -> tuple[list[str], list[np.ndarray]]:
    """Row names and per-layer kernels (float64, full), after checking that the rows'
    kernels sum to the whole kernel of the Jacobian path."""
    request = make_request(kernel="full", dtype="float64", **options)
    measured = build(model, x, request=request, per_layer=True)
    kernels = [np.asarray(layer.kernel) for layer in measured.layers]
    whole = cvcore.ntk(model, x, kernel="full", dtype="float64", implementation="jacobian",
                       **{k: v for k, v in options.items() if k != "implementation"})
    assert rel(np.sum(kernels, axis=0), whole) < 1e-10
    return [layer.name for layer in measured.layers], kernels


def test_torch_sequential_and_nested_module_rows() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    names, _ = _split(seq.double(), _x(4))
    assert names == ["0", "2"]

    class Nested(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = torch.nn.ModuleDict({"fc": torch.nn.Linear(4, 5)})
            self.head = torch.nn.Sequential(torch.nn.Linear(5, 2))
            self.scale = torch.nn.Parameter(torch.tensor(1.5))

        def forward(self, x: Any) -> Any:
            return self.scale * self.head(torch.tanh(self.block["fc"](x)))

    names, _ = _split(Nested().double(), _x(4))
    assert names == ["(root)", "block.fc", "head.0"]


def test_torch_autoencoder_rows_have_no_adapter_prefix() -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)

    class AE(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
                                               torch.nn.Linear(3, 2))
            self.decoder = torch.nn.Linear(2, 4)

        def encode(self, x: Any) -> Any:
            return self.encoder(x)

        def decode(self, z: Any) -> Any:
            return self.decoder(z)

        def forward(self, x: Any) -> Any:
            return self.decode(self.encode(x))

    model = AE().double()
    names, kernels = _split(model, _x(4))
    assert names == ["encoder.0", "encoder.2", "decoder"]
    names, latent = _split(model, _x(4), output="latent")
    assert names == ["encoder.0", "encoder.2", "decoder"]  # every layer has its row
    assert np.abs(latent[2]).max() == 0  # the code does not depend on the decoder
    # the decoder's row is the kernel of the decoder alone (every encoder weight frozen)
    frozen = AE().double()
    frozen.load_state_dict(model.state_dict())
    for p in frozen.encoder.parameters():
        p.requires_grad_(False)
    assert rel(kernels[2], cvcore.ntk(frozen, _x(4), kernel="full", dtype="float64")) < 1e-10


def test_flax_linen_rows() -> None:
    pytest.importorskip("flax")
    from flax import linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return jnp.tanh(nn.Dense(5, name="fc")(x))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.Dense(2, name="head")(Block(name="block")(nn.Dense(4, name="inp")(x)))

    x = _x(3)
    variables = Net().init(jax.random.key(0), jnp.asarray(x[:1]))
    names, _ = _split((Net(), variables), x)
    assert names == ["block.fc", "head", "inp"]  # the params tree's (sorted) order


def test_flax_nnx_rows_are_layers_not_parameters() -> None:
    pytest.importorskip("flax")
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs: Any) -> None:
            self.l1 = nnx.Linear(3, 4, rngs=rngs)
            self.blocks = nnx.List([nnx.Linear(4, 4, rngs=rngs)])
            self.l2 = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            return self.l2(jnp.tanh(self.blocks[0](jnp.tanh(self.l1(x)))))

    names, _ = _split(Net(nnx.Rngs(0)), _x(3))
    assert names == ["blocks.0", "l1", "l2"]


def test_equinox_rows() -> None:
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(3, 2, 4, 2, activation=jnp.tanh, key=jax.random.key(1))
    names, _ = _split(model, _x(3))
    assert names == ["layers.0", "layers.1", "layers.2"]


def test_keras_rows_nested_layers_joined_by_dots() -> None:
    keras = _keras()
    block = keras.Sequential([keras.layers.Dense(4, activation="tanh", name="fc")],
                             name="block")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="inp"), block,
                              keras.layers.Dense(2, name="head")], name="net")
    names, _ = _split(model, _x(3))
    assert names == ["inp", "block.fc", "head"]


def test_tf_module_rows_are_attribute_paths() -> None:
    tf = pytest.importorskip("tensorflow")

    class Linear(tf.Module):
        def __init__(self, d_in: int, d_out: int, seed: int) -> None:
            super().__init__()
            init = tf.random.stateless_normal((d_in, d_out), (seed, 0), dtype=tf.float64)
            self.w = tf.Variable(init / 2, name="w")
            self.b = tf.Variable(tf.fill((d_out,), tf.constant(0.1, tf.float64)), name="b")

        def __call__(self, x: Any) -> Any:
            return x @ self.w + self.b

    class Net(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="net")
            self.l1 = Linear(3, 4, 1)
            self.l2 = Linear(4, 2, 2)

        def __call__(self, x: Any) -> Any:
            return self.l2(tf.tanh(self.l1(x)))

    names, _ = _split(Net(), _x(3))
    assert names == ["l1", "l2"]  # before: one '(root)' row (the variables' names are w, b)
