"""JAX structured NTK: layer rules read off the jaxpr, against per-output gradient loops.

The reference is independent of both JAX kernel paths: one ``jax.grad`` per sample and
per output, stacked into ``J`` in float64, ``K_full = J Jᵀ``, and the traced kernel the
mean of the output-diagonal blocks. Every model is measured with ``auto`` and
``structured`` and with each exact rule imposed on every ruled leaf (``pairs``, ``jac``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
pytest.importorskip("flax")
eqx = pytest.importorskip("equinox")
from cvcore.backends.jax import jacobian as jj
from cvcore.backends.jax import jaxpr as jx
from cvcore.backends.jax import setup as jb
from cvcore.backends.jax import sites as jr
from cvcore.backends.jax import structured as js
from cvcore.backends.jax.backend import JaxBackend
from flax import linen as nn
from flax import nnx

import cvcore
from cvcore.api import make_request
from cvcore.blocking import dense_costs
from cvcore.protocols import Implementation
from tests.tolerance import rel_error as rel

N = 4


# --------------------------------------------------------------------------- models
class MLP(nn.Module):
    @nn.compact
    def __call__(self, x: Any) -> Any:
        return nn.Dense(3)(jnp.tanh(nn.Dense(7)(x)))


class CNN(nn.Module):
    """Strided, padded, dilated and non-square convolutions; a grouped one."""

    @nn.compact
    def __call__(self, x: Any) -> Any:
        h = jax.nn.relu(nn.Conv(4, (3, 2), strides=(2, 1), padding="SAME")(x))
        h = jnp.tanh(nn.Conv(4, (2, 2), kernel_dilation=(2, 1), padding="VALID")(h))
        h = nn.Conv(4, (1, 1), feature_group_count=2)(h)
        h = nn.avg_pool(h, (1, 2))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))


class Block(nn.Module):
    """Pre-norm attention block: DenseGeneral projections (several axes contracted)."""

    @nn.compact
    def __call__(self, x: Any) -> Any:
        h = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(nn.LayerNorm()(x))
        h = h + nn.Dense(6)(nn.gelu(nn.Dense(12)(nn.LayerNorm()(h))))
        return nn.Dense(2)(h.mean(axis=1))


class Tied(nn.Module):
    """An embedding also used as the output layer, and one Dense used twice."""

    @nn.compact
    def __call__(self, ids: Any) -> Any:
        embed = nn.Embed(11, 5)
        shared = nn.Dense(5)
        h = embed(ids)
        h = shared(jnp.tanh(shared(h)))
        return embed.attend(h.mean(axis=1))[:, :3]


class Lookup(nn.Module):
    """Embedding tables with a rule of their own (one read in ``clip`` mode), a dense head."""

    @nn.compact
    def __call__(self, ids: Any) -> Any:
        h = nn.Embed(9, 4)(ids)
        table = self.param("table", nn.initializers.normal(1.0), (6, 4))
        h = h + jnp.take(table, ids + 3, axis=0, mode="clip")  # ids past the end: clipped
        return nn.Dense(3)(jnp.tanh(h).reshape(h.shape[0], -1))


class Norm(nn.Module):
    @nn.compact
    def __call__(self, x: Any, train: bool = False) -> Any:
        h = nn.BatchNorm(use_running_average=not train)(nn.Dense(6)(x))
        return nn.Dense(2)(jnp.tanh(h))


def raw_apply(p: Any, x: Any) -> Any:
    """Parameters as the left operand, an einsum, a scaled weight, a scan over layers."""
    h = jnp.tanh((p["w_left"] @ x.T).T)  # dot_general(W, x)
    h = jnp.einsum("bi,ij->bj", h, p["w_ein"]) * 0.5
    h = h @ (2.0 * p["w_scaled"])  # elementwise use: measured directly

    def layer(c: Any, w: Any) -> tuple[Any, None]:
        return jnp.tanh(c @ w), None

    h, _ = jax.lax.scan(layer, h, p["w_stack"])
    return h @ p["w_out"]


def bias_apply(p: Any, x: Any) -> Any:
    """Biases a rule can absorb, and ones it cannot: per position, after only one use of
    a shared weight, used again elsewhere."""
    h = jnp.tanh(x @ p["w1"] + p["b1"])  # broadcast over the 3 positions: folded
    h = jnp.tanh(h @ p["w2"] + p["pos"])  # a different value per position: direct
    h = jnp.tanh(h @ p["w3"] + p["b3"]) @ p["w3"]  # w3 twice, b3 after one use: direct
    out = h.mean(axis=1) @ p["w_out"] + p["b_out"]
    return out * (1.0 + 0.1 * p["b_out"])  # b_out also scales: direct


def bias_params() -> dict[str, Any]:
    k = jax.random.split(jax.random.key(4), 8)
    shapes = {"w1": (4, 5), "b1": (5,), "w2": (5, 5), "pos": (3, 5), "w3": (5, 5), "b3": (5,),
              "w_out": (5, 2), "b_out": (2,)}
    return {name: jax.random.normal(key, shape) / 2
            for key, (name, shape) in zip(k, shapes.items())}


def raw_params() -> dict[str, Any]:
    k = jax.random.split(jax.random.key(3), 5)
    return {"w_left": jax.random.normal(k[0], (6, 4)) / 2,
            "w_ein": jax.random.normal(k[1], (6, 6)) / 2,
            "w_scaled": jax.random.normal(k[2], (6, 5)) / 2,
            "w_stack": jax.random.normal(k[3], (2, 5, 5)) / 2,
            "w_out": jax.random.normal(k[4], (5, 3)) / 2}


class NnxNet(nnx.Module):
    def __init__(self, rngs: Any) -> None:
        self.conv = nnx.Conv(1, 3, (3,), rngs=rngs)
        self.out = nnx.Linear(3 * 6, 2, rngs=rngs)

    def __call__(self, x: Any) -> Any:
        h = jnp.tanh(self.conv(x[..., None]))
        return self.out(h.reshape(h.shape[0], -1))


def _linen(module: nn.Module, x: Any) -> tuple[Any, Any]:
    return module, module.init(jax.random.key(0), jnp.asarray(x[:1]))


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def make(name: str) -> tuple[Any, Any]:
    """``(model, inputs)`` for each case."""
    if name == "mlp":
        x = _rng().normal(size=(N, 5))
        return _linen(MLP(), x), x
    if name == "cnn":
        x = _rng().normal(size=(N, 6, 5, 2))
        return _linen(CNN(), x), x
    if name == "block":
        x = _rng().normal(size=(N, 3, 6))
        return _linen(Block(), x), x
    if name == "tied":
        x = _rng().integers(0, 11, size=(N, 3))
        return _linen(Tied(), x), x
    if name == "lookup":
        x = np.array([[0, 3, 8], [3, 3, 1], [7, -1, 2], [5, 0, 8]])
        module = Lookup()
        return (module, module.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))), x
    if name == "norm":
        x = _rng().normal(size=(N, 4))
        model, v = _linen(Norm(), x)
        stats = jax.tree_util.tree_map(lambda a: a + 0.3, v["batch_stats"])
        return (model, {**v, "batch_stats": stats}), x
    if name == "raw":
        return (raw_apply, raw_params()), _rng().normal(size=(N, 4))
    if name == "biases":
        return (bias_apply, bias_params()), _rng().normal(size=(N, 3, 4))
    if name == "equinox":
        return eqx.nn.MLP(4, 3, 6, 2, activation=jnp.tanh, key=jax.random.key(2)), \
            _rng().normal(size=(N, 4))
    if name == "nnx":
        return NnxNet(nnx.Rngs(0)), _rng().normal(size=(N, 6))
    raise ValueError(name)


CASES = ["mlp", "cnn", "block", "tied", "lookup", "norm", "raw", "biases", "equinox", "nnx"]


# --------------------------------------------------------------------------- reference
def reference(model: Any, x: Any) -> np.ndarray:
    """Full kernel from one ``jax.grad`` per (sample, output), float64."""
    with jb.x64_scope(True):
        prep = jb.prepare_model(model, train=False)
        params = jb.cast_tree(prep.params, jnp.float64, jax.devices("cpu")[0])
        consts = jb.cast_tree(prep.constants, jnp.float64, jax.devices("cpu")[0])
        xs = jnp.asarray(x, jnp.float64 if np.issubdtype(x.dtype, np.floating) else x.dtype)

        def output(p: Any, i: int) -> Any:
            xi = xs[i:i + 1] if prep.batched else xs[i]
            return prep.call(p, consts, xi).reshape(-1)

        n_out = int(output(params, 0).shape[0])
        rows = []
        for i in range(len(x)):
            for o in range(n_out):
                grad = jax.grad(lambda p, i=i, o=o: output(p, i)[o])(params)
                leaves = [g for g in jax.tree_util.tree_leaves(grad)
                          if jnp.issubdtype(g.dtype, jnp.inexact)]
                rows.append(np.concatenate([np.asarray(g).ravel() for g in leaves]))
    j = np.stack(rows)
    return j @ j.T


def traced_from_full(full: np.ndarray, n: int) -> np.ndarray:
    o = full.shape[0] // n
    return full.reshape(n, o, n, o).trace(axis1=1, axis2=3) / o


@pytest.fixture(scope="module")
def references() -> dict[str, np.ndarray]:
    return {name: reference(*make(name)) for name in CASES}


def structured(model: Any, x: Any, kernel: str, force: str | None = None,
               implementation: str = "structured", budget: str | None = None,
               dtype: str = "float64") -> tuple[np.ndarray | None, jr.Analysis]:
    """``structured_kernel`` called directly (so a silent fallback cannot pass), and the
    analysis it acted on."""
    request = make_request(kernel=kernel, dtype=dtype, implementation=implementation,
                           memory_budget=budget)
    device = jax.devices("cpu")[0]
    jdtype = jnp.float64 if dtype == "float64" else jnp.float32
    with jb.x64_scope(dtype == "float64"), jax.default_device(device), \
            jax.default_matmul_precision("highest"):
        prep = jb.prepare_model(model, train=False)
        prep.params = jb.cast_tree(prep.params, jdtype, device)
        prep.constants = jb.cast_tree(prep.constants, jdtype, device)
        leaves = jb.flatten_params(prep.params)
        xs = jb.as_inputs(x, jdtype, device)
        n_out = jx.probe_outputs(prep, leaves, xs, None)
        analysis = jr.analyse(jx.trace(prep, leaves, xs, None).jaxpr, len(leaves.trainable))
        return js.structured_kernel(prep, leaves, xs, request, n_out, force=force), analysis


# --------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("kernel", ["full", "traced"])
@pytest.mark.parametrize("force", ["pairs", "jac"])
def test_rules_equal_per_output_gradients(name: str, kernel: str, force: str | None,
                                          references: dict[str, np.ndarray]) -> None:
    model, x = make(name)
    k, analysis = structured(model, x, kernel, force=force)
    assert analysis.sites, "every case has at least one ruled leaf"
    assert k is not None
    full = references[name]
    expected = full if kernel == "full" else traced_from_full(full, N)
    assert rel(k, expected) < 1e-11


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("implementation", ["auto", "structured", "jacobian"])
def test_public_api_gives_the_same_kernel(name: str, implementation: str,
                                          references: dict[str, np.ndarray]) -> None:
    model, x = make(name)
    k = cvcore.ntk(model, x, kernel="full", dtype="float64", implementation=implementation)
    assert rel(k, references[name]) < 1e-11


def leaf_names(model: Any, x: Any) -> list[str]:
    with jb.x64_scope(True):
        leaves = jb.flatten_params(jb.prepare_model(model, train=False).params)
    return [leaves.paths[i] for i in leaves.trainable]


def ruled(name: str) -> tuple[dict[str, list[str]], set[str], dict[str, str]]:
    """Site kinds per ruled leaf name, the names of directly measured leaves, and the
    biases folded into their weights."""
    model, x = make(name)
    _, analysis = structured(model, x, "full")
    names = leaf_names(model, x)
    kinds: dict[str, list[str]] = {}
    for site in analysis.sites:
        kinds.setdefault(names[site.leaf], []).append(site.kind)
    folded = {names[w]: names[b] for w, b in analysis.bias.items()}
    return kinds, {names[i] for i in analysis.direct}, folded


def test_which_leaves_get_rules() -> None:
    kinds, direct, folded = ruled("cnn")
    assert kinds == {"['Conv_0']['kernel']": ["conv"], "['Conv_1']['kernel']": ["conv"],
                     "['Conv_2']['kernel']": ["conv"], "['Dense_0']['kernel']": ["dense"]}
    assert direct == set()  # the grouped Conv_2 too (tests/backends/jax/test_jax_grouped_conv.py)
    assert folded == {f"['{m}']['kernel']": f"['{m}']['bias']"
                      for m in ("Conv_0", "Conv_1", "Conv_2", "Dense_0")}

    kinds, direct, folded = ruled("biases")
    assert kinds == {"['w1']": ["dense"], "['w2']": ["dense"], "['w3']": ["dense", "dense"],
                     "['w_out']": ["dense"]}
    assert folded == {"['w1']": "['b1']"}
    assert direct == {"['pos']", "['b3']", "['b_out']"}

    kinds, direct, folded = ruled("tied")
    assert kinds == {"['Dense_0']['kernel']": ["dense", "dense"]}  # shared: two sites
    assert folded == {"['Dense_0']['kernel']": "['Dense_0']['bias']"}  # after both uses
    assert direct == {"['Embed_0']['embedding']"}  # gather and attend disagree: direct

    kinds, direct, _ = ruled("lookup")
    assert kinds == {"['Embed_0']['embedding']": ["embedding"], "['table']": ["embedding"],
                     "['Dense_0']['kernel']": ["dense"]}

    kinds, direct, _ = ruled("raw")
    assert set(kinds) == {"['w_left']", "['w_ein']", "['w_out']"}
    assert direct == {"['w_scaled']", "['w_stack']"}

    kinds, direct, folded = ruled("block")
    projections = [k for k in kinds if "MultiHeadDotProductAttention" in k]
    assert len(projections) == 4 and all(kinds[k] == ["dense"] for k in projections)
    assert all(folded[k] == k.replace("kernel", "bias") for k in projections)
    assert all("LayerNorm" in k for k in direct)


def test_blocks_under_a_small_budget(monkeypatch: pytest.MonkeyPatch,
                                     references: dict[str, np.ndarray]) -> None:
    model, x = make("block")
    calls = []
    original = jb.pad_batch
    monkeypatch.setattr(jb, "pad_batch", lambda b, size: calls.append(size) or original(b, size))
    k, _ = structured(model, x, "full", force="pairs", budget="24KiB")
    assert k is not None and len(calls) > 1 and max(calls) < N  # several sample blocks
    assert rel(k, references["block"]) < 1e-11


def test_too_small_budget_falls_back_to_the_jacobian_path(
        references: dict[str, np.ndarray]) -> None:
    model, x = make("mlp")
    k, _ = structured(model, x, "full", budget="64B")
    assert k is None
    full = cvcore.ntk(model, x, kernel="full", dtype="float64", memory_budget="64B")
    assert rel(full, references["mlp"]) < 1e-11


def test_train_mode_uses_batch_statistics() -> None:
    model, x = make("norm")
    got = cvcore.ntk(model, x, kernel="full", dtype="float64", train=True)
    jacobian = cvcore.ntk(model, x, kernel="full", dtype="float64", train=True,
                          implementation="jacobian")
    evaluation = cvcore.ntk(model, x, kernel="full", dtype="float64")
    assert rel(got, jacobian) < 1e-12
    assert rel(got, evaluation) > 1e-3  # batch statistics, not the running ones


def test_float32_agrees_with_float64(references: dict[str, np.ndarray]) -> None:
    model, x = make("block")
    k, _ = structured(model, x, "full", dtype="float32")
    assert k is not None and k.dtype == np.float32
    assert rel(k, references["block"]) < 2e-5


def test_cache_reuses_compilation_but_not_weights() -> None:
    module = MLP()
    x = _rng(1).normal(size=(N, 5))
    before = len(js._COMPILED)
    for seed in (0, 1):
        variables = module.init(jax.random.key(seed), jnp.asarray(x[:1]))
        got = cvcore.ntk((module, variables), x, kernel="full", dtype="float64")
        assert rel(got, reference((module, variables), x)) < 1e-11
    assert len(js._COMPILED) <= before + 1


def test_auto_keeps_a_rule_only_where_pairs_is_cheaper() -> None:
    wide = jr.Site((0,), "dense", 0, 1, ("dense",), (1, 256), np.float32, (0, 1), 1, 784, 256)
    conv = jr.Site((1,), "conv", 1, 1, ("conv",), (1, 28, 28, 16), np.float32, (0, 1, 2, 3),
                   784, 9, 16)
    analysis = jr.Analysis(sites=[wide, conv], direct={2})
    sizes = [784 * 256, 9 * 16, 10]
    layout = js.choose(analysis, sizes, 256, 10, False, Implementation.AUTO)
    assert layout.rules == {0: "pairs"} and layout.direct == [1, 2]
    assert dense_costs(256, 256, 10, 784, 9, 16, False)["pairs"] > 256 * 256 * 100 * 144
    every = js.choose(analysis, sizes, 256, 10, False, Implementation.STRUCTURED)
    assert every.rules == {0: "pairs", 1: "jac"} and every.direct == [2]
    on_cpu = js.choose(analysis, sizes, 256, 10, False, Implementation.AUTO, patches=True)
    assert on_cpu.rules == {0: "pairs", 1: "jac"} and on_cpu.direct == [2]


def _unused(p: Any, x: Any) -> Any:
    return x @ p["w"]


def test_unused_leaf_contributes_nothing() -> None:
    params = {"w": jnp.ones((3, 2)), "spare": jnp.ones((4,))}
    x = _rng().normal(size=(N, 3))
    k = cvcore.ntk((_unused, params), x, kernel="full", dtype="float64")
    expected = np.kron(x @ x.T, np.eye(2))  # ∂(x W)_o / ∂W = x ⊗ e_o
    assert rel(k, expected) < 1e-12



@pytest.mark.parametrize("name", CASES)
def test_diagonal_from_rules_equals_the_reference(name: str,
                                                  references: dict[str, np.ndarray]) -> None:
    model, x = make(name)
    full = references[name]
    for implementation in ("auto", "structured"):
        for kernel in ("full", "traced"):
            request = make_request(kernel=kernel, dtype="float64", implementation=implementation)
            got = JaxBackend().diagonal(model, x, request)
            expected = np.diag(full if kernel == "full" else traced_from_full(full, N))
            assert rel(got, expected) < 1e-11


def test_diagonal_uses_the_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    from cvcore.backends.jax.setup import prepare as _setup

    model, x = make("mlp")
    request = make_request(kernel="full", dtype="float64")
    calls = []
    original = js.structured_diagonal
    monkeypatch.setattr(js, "structured_diagonal",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    assert JaxBackend().diagonal(model, x, request).shape == (N * 3,)
    assert calls
    with jb.x64_scope(True):
        s = _setup(model, x, request, jax.devices("cpu")[0], False)
        ruled = original(s.prep, s.leaves, s.x, request, s.n_outputs)
    assert ruled is not None and ruled.shape == (N, 3)  # no fallback to Jacobians


@pytest.mark.parametrize("implementation", ["jacobian", "structured"])
@pytest.mark.parametrize("train", [False, True])
def test_compile_caches_never_reuse_weights_or_closed_over_arrays(
        implementation: str, train: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two models that trace to the same jaxpr text, differing in their weights and in an
    array their function closes over, share one compilation but not their values."""
    import collections

    monkeypatch.setattr(jj, "_JITTED", collections.OrderedDict())
    monkeypatch.setattr(js, "_COMPILED", collections.OrderedDict())
    x = _rng(2).normal(size=(N, 3))
    kernels = []
    for seed in (0, 1):
        scale = jnp.asarray(_rng(10 + seed).normal(size=(2,)))

        def apply(p: Any, x: Any, scale: Any = scale) -> Any:
            return jnp.tanh(x @ p["w"]) * scale

        params = {"w": jnp.asarray(_rng(seed).normal(size=(3, 2)))}
        # A fixed budget: the default follows the memory available at each call, and a
        # different budget can mean a different block size, hence another compilation.
        got = cvcore.ntk((apply, params), x, kernel="full", dtype="float64",
                         implementation=implementation, train=train, memory_budget="256MB")
        assert rel(got, reference((apply, params), x)) < 1e-11
        sizes = (len(jj._JITTED), len(js._COMPILED))
        kernels.append((got, sizes))
    assert kernels[0][1] == kernels[1][1] and sum(kernels[0][1]) > 0  # a cache hit
    assert rel(kernels[0][0], kernels[1][0]) > 1e-3


def test_trace_cache_serves_new_weights_and_batch_statistics(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One trace per (model object, shapes): a second checkpoint of the same flax module,
    with other weights and other batch statistics, reuses it and gets its own kernel."""
    import collections

    monkeypatch.setattr(jx, "_TRACES", collections.OrderedDict())
    (module, variables), x = make("norm")
    first = cvcore.ntk((module, variables), x, kernel="full", dtype="float64")
    second_vars = jax.tree_util.tree_map(lambda a: a * 1.5 + 0.2, variables)
    second = cvcore.ntk((module, second_vars), x, kernel="full", dtype="float64")
    assert len(jx._TRACES) == 1  # the second call was served from the cache
    assert rel(first, reference((module, variables), x)) < 1e-11
    assert rel(second, reference((module, second_vars), x)) < 1e-11
    assert rel(first, second) > 1e-3
    other = Norm()  # another module object: traced on its own
    cvcore.ntk((other, variables), x, kernel="full", dtype="float64")
    assert len(jx._TRACES) == 2


def test_an_unexpected_failure_of_the_rules_falls_back_with_a_warning(
        monkeypatch: pytest.MonkeyPatch, references: dict[str, np.ndarray]) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise AttributeError("'JaxprEqn' object has no attribute 'params'")

    monkeypatch.setattr(js, "analyse", broken)
    model, x = make("mlp")
    with pytest.warns(UserWarning, match="structured JAX path failed.*Jacobian path"):
        k = cvcore.ntk(model, x, kernel="full", dtype="float64")
    assert rel(k, references["mlp"]) < 1e-11
    request = make_request(kernel="full", dtype="float64")
    with pytest.warns(UserWarning, match="structured JAX path failed"):
        d = JaxBackend().diagonal(model, x, request)
    assert rel(d, np.diag(references["mlp"])) < 1e-11


def test_errors_of_the_model_are_not_swallowed() -> None:
    model, x = make("mlp")
    x = x.copy()
    x[2, 0] = np.nan
    with pytest.raises(cvcore.errors.ModelError, match="NaN/Inf for 1 of 4 samples"):
        cvcore.ntk(model, x, kernel="full", dtype="float64")
