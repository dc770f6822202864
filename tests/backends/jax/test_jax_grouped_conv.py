"""Grouped and depthwise convolutions on the JAX structured path, against per-sample
``jax.jacrev`` in float64: a JAX function (groups = channels with a channel multiplier,
groups = 2 and 3, strides, explicit and ``SAME`` padding, filter and input dilation, NHWC
and NCHW layouts, a folded bias) and a Keras model on the JAX Keras backend (run in a
subprocess with ``KERAS_BACKEND=jax``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
from cvcore.backends.jax import jaxpr as jx
from cvcore.backends.jax import setup as jb
from cvcore.backends.jax import sites as jr
from cvcore.backends.jax import structured as js
from jax import lax

import cvcore
from cvcore.api import make_request
from tests.tolerance import rel_error as rel

N = 3
NHWC = ("NHWC", "HWIO", "NHWC")


def grouped_apply(p: dict[str, Any], x: Any) -> Any:
    """Depthwise (4 groups, 2 filters each), then 2 groups, then 3 groups in NCHW/OIHW."""
    h = lax.conv_general_dilated(x, p["dw"], (2, 1), "SAME", rhs_dilation=(1, 2),
                                 dimension_numbers=NHWC, feature_group_count=4)
    h = jnp.tanh(h + p["dw_bias"])
    h = lax.conv_general_dilated(h, p["g2"], (1, 1), ((1, 0), (0, 1)), rhs_dilation=(2, 1),
                                 dimension_numbers=NHWC, feature_group_count=2)
    h = jnp.tanh(jnp.transpose(h, (0, 3, 1, 2)))  # NCHW
    h = lax.conv_general_dilated(h, p["g3"], (1, 2), ((0, 1), (1, 1)), lhs_dilation=(2, 1),
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                 feature_group_count=3)
    return jnp.tanh(h).mean(axis=(2, 3)) @ p["out"]


def grouped_params() -> dict[str, Any]:
    """float64 weights (made outside x64 they would be rounded to float32)."""
    rng = np.random.default_rng(0)
    shapes = {"dw": (3, 3, 1, 8), "dw_bias": (8,), "g2": (2, 2, 4, 6), "g3": (6, 2, 1, 2),
              "out": (6, 3)}
    with jb.x64_scope(True):
        return {k: jnp.asarray(rng.normal(size=s) * 0.7) for k, s in shapes.items()}


def grouped_inputs() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(N, 7, 6, 4))


def jacrev_kernels(apply: Any, params: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """Full and traced kernels from one ``jax.jacrev`` per sample, float64."""
    with jb.x64_scope(True):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
        rows = []
        for i in range(len(x)):
            jac = jax.jacrev(lambda p, i=i: apply(p, jnp.asarray(x[i:i + 1])).reshape(-1))(params)
            rows.append(np.concatenate([np.asarray(j).reshape(j.shape[0], -1)
                                        for j in jax.tree_util.tree_leaves(jac)], axis=1))
    j = np.stack(rows)  # (N, O, P)
    flat = j.reshape(-1, j.shape[2])
    return {"full": flat @ flat.T, "traced": np.einsum("iop,jop->ij", j, j) / j.shape[1]}


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return jacrev_kernels(grouped_apply, grouped_params(), grouped_inputs())


def structured(kernel: str, force: str | None, implementation: str = "structured"
               ) -> tuple[np.ndarray | None, jr.Analysis, js.Layout]:
    """``structured_kernel`` called directly (no silent fallback), its analysis and layout."""
    request = make_request(kernel=kernel, dtype="float64", implementation=implementation)
    device = jax.devices("cpu")[0]
    with jb.x64_scope(True), jax.default_device(device):
        prep = jb.prepare_model((grouped_apply, grouped_params()), train=False)
        prep.params = jb.cast_tree(prep.params, jnp.float64, device)
        leaves = jb.flatten_params(prep.params)
        xs = jb.as_inputs(grouped_inputs(), jnp.float64, device)
        n_out = jx.probe_outputs(prep, leaves, xs, None)
        traced = jx.trace(prep, leaves, xs, None)
        analysis = jr.analyse(traced.jaxpr, len(leaves.trainable))
        layout = js.choose(analysis, [int(leaves.values[i].size) for i in leaves.trainable],
                           N, n_out, kernel == "traced", request.implementation, force,
                           patches=True)
        return js.structured_kernel(prep, leaves, xs, request, n_out, force=force), analysis, layout


def test_grouped_convolutions_get_a_rule() -> None:
    """Every filter has a grouped conv site, the bias after the depthwise one is folded,
    and every grouped filter is measured by ``jac`` (``pairs`` is not offered)."""
    _, analysis, layout = structured("full", "pairs")
    with jb.x64_scope(True):
        names = jb.flatten_params(jb.prepare_model((grouped_apply, grouped_params()), train=False)
                                  .params).paths
    groups = {names[s.leaf]: (s.kind, s.groups, s.d_in, s.d_out) for s in analysis.sites}
    assert groups == {"['dw']": ("conv", 4, 9, 8), "['g2']": ("conv", 2, 16, 6),
                      "['g3']": ("conv", 3, 4, 6), "['out']": ("dense", 1, 6, 3)}
    assert {names[w]: names[b] for w, b in analysis.bias.items()} == {"['dw']": "['dw_bias']"}
    assert analysis.direct == set()
    by_name = {names[leaf]: rule for leaf, rule in layout.rules.items()}
    assert by_name == {"['dw']": "jac", "['g2']": "jac", "['g3']": "jac", "['out']": "pairs"}


@pytest.mark.parametrize("kernel", ["full", "traced"])
@pytest.mark.parametrize("force", ["pairs", "jac", None])
def test_grouped_rule_equals_per_sample_jacrev(kernel: str, force: str | None,
                                               expected: dict[str, np.ndarray]) -> None:
    k, _, _ = structured(kernel, force)
    assert k is not None
    assert rel(k, expected[kernel]) < 1e-12


@pytest.mark.parametrize("implementation", ["auto", "structured", "jacobian"])
def test_public_api_on_grouped_convolutions(implementation: str,
                                            expected: dict[str, np.ndarray]) -> None:
    model = (grouped_apply, grouped_params())
    k = cvcore.ntk(model, grouped_inputs(), kernel="full", dtype="float64",
                   implementation=implementation)
    assert rel(k, expected["full"]) < 1e-12
    diag = cvcore.measure(model, grouped_inputs(), kernel="full", dtype="float64",
                          variables=["trace"]).trace
    assert abs(diag - np.trace(expected["full"])) < 1e-10 * np.trace(expected["full"])


# --------------------------------------------------------------------------- Keras on JAX
KERAS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, keras, numpy as np
    import cvcore
    from cvcore.backends.jax import structured
    from cvcore.backends.keras.setup import keras_float64

    jax.config.update("jax_enable_x64", True)  # for the jacrev reference below
    keras.config.set_dtype_policy("float64")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((9, 10, 4), dtype="float64"),
        keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2,
                                     activation="tanh"),
        keras.layers.Conv2D(6, 2, groups=2, dilation_rate=2, padding="same", activation="tanh"),
        keras.layers.DepthwiseConv2D(3, dilation_rate=(1, 2), padding="valid", use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("tanh"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3),
    ])
    rng = np.random.default_rng(0)
    model.set_weights([np.abs(w) + 0.5 if "variance" in v.path else w
                       for v, w in ((v, rng.normal(size=v.shape)) for v in model.weights)])
    x = np.random.default_rng(1).normal(size=(3, 9, 10, 4))

    seen = []
    original = structured.choose
    def spy(analysis, *args, **kwargs):
        layout = original(analysis, *args, **kwargs)
        seen.append(sorted((s.groups, layout.rules.get(s.leaf, "direct")) for s in analysis.sites))
        return layout
    structured.choose = spy

    out = {"backend": keras.backend.backend()}
    for impl in ("auto", "jacobian"):
        for kind in ("traced", "full"):
            out[impl + kind] = cvcore.ntk(model, x, kernel=kind, dtype="float64",
                                          implementation=impl).tolist()
    out["trace"] = cvcore.measure(model, x, dtype="float64", variables=["trace"]).trace
    out["sites"] = seen

    theta = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]
    def f(theta, xi):
        y, _ = model.stateless_call(theta, fixed, xi[None], training=False)
        return y.reshape(-1)
    rows = []
    # Keras on JAX promotes float64 to float32 unless told otherwise (keras_float64 says how)
    with keras_float64("jax", True):
        for i in range(len(x)):
            jac = jax.jacrev(f)(theta, jnp.asarray(x[i]))
            rows.append(np.concatenate([np.asarray(j).reshape(3, -1) for j in jac], axis=1))
    j = np.stack(rows)
    out["ref_traced"] = (np.einsum("iop,jop->ij", j, j) / 3).tolist()
    flat = j.reshape(-1, j.shape[2])
    out["ref_full"] = (flat @ flat.T).tolist()
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_keras_on_jax_grouped_and_depthwise() -> None:
    """Keras' DepthwiseConv2D (strided, multiplier 2; dilated, no bias) and a grouped
    Conv2D on the JAX Keras backend: measured by the grouped rule under ``auto``, equal
    to per-sample ``jax.jacrev`` of ``stateless_call`` and to the Jacobian path."""
    pytest.importorskip("keras")
    done = subprocess.run([sys.executable, "-c", KERAS_SCRIPT], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": "jax"}, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["backend"] == "jax"
    for kind in ("traced", "full"):
        ref = np.asarray(got["ref_" + kind])
        for impl in ("auto", "jacobian"):
            assert rel(got[impl + kind], ref) < 1e-12, (impl, kind)
    assert abs(got["trace"] - np.trace(got["ref_traced"])) < 1e-10 * np.trace(got["ref_traced"])
    # every call that planned: the three grouped filters (4, 2 and 6 groups) by jac
    assert got["sites"] and all(sorted(g for g, _ in sites if g > 1) == [2, 4, 6]
                                for sites in got["sites"])
    assert all(rule == "jac" for sites in got["sites"] for g, rule in sites if g > 1)
