"""Per-layer kernels (``per_layer=True``, ``cv measure --per-layer``) on every backend.

Each layer's kernel is checked against an independent reference: the kernel of the same
model with every other layer frozen (``requires_grad=False`` in torch; in JAX and Keras,
``J_l`` from explicit per-sample gradients). The layers' traces sum to the model's.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cvcore.spectrum import collective_variables

torch = pytest.importorskip("torch")

import cvcore
from tests import torch_models as tm
from tests.backends.torch.test_row_soundness import per_sample_kernel


def frozen_except(model: Any, layer: str) -> Any:
    other = copy.deepcopy(model)
    for name, p in other.named_parameters():
        p.requires_grad_(name.rpartition(".")[0] == layer)
    return other


@pytest.mark.parametrize("impl", ["auto", "structured", "jacobian"])
@pytest.mark.parametrize("make", [tm.mlp, tm.SmallCNN, tm.NormGelu], ids=["mlp", "cnn", "norm"])
def test_torch_layers_match_each_layer_alone(make: Any, impl: str) -> None:
    torch.manual_seed(0)
    model = make().double()
    shape = {tm.mlp: (8, 6), tm.SmallCNN: (6, 1, 6, 6), tm.NormGelu: (8, 5)}[make]
    x = torch.randn(*shape, dtype=torch.float64)
    result = cvcore.measure(model, x, per_layer=True, dtype="float64", implementation=impl)
    whole = cvcore.measure(model, x, dtype="float64", implementation="jacobian")
    names = [n.rpartition(".")[0] for n, _ in model.named_parameters()]
    assert [r.layer for r in result.layers] == list(dict.fromkeys(names))
    assert sum(r.trace for r in result.layers) == pytest.approx(whole.trace, rel=1e-12)
    assert sum(r.share for r in result.layers) == pytest.approx(1.0, rel=1e-12)
    assert result.model.entropy == pytest.approx(whole.entropy, rel=1e-10)
    for row in result.layers:
        alone = frozen_except(model, row.layer)
        ref = per_sample_kernel(alone, lambda i, m=alone: m(x[i:i + 1]), x.shape[0])
        cv = collective_variables(ref)
        assert row.trace == pytest.approx(cv.trace, rel=1e-10), row.layer
        assert row.entropy == pytest.approx(cv.entropy, rel=1e-9), row.layer
        assert row.effective_rank == pytest.approx(cv.effective_rank, rel=1e-9)
        assert row.n_params == sum(p.numel() for p in alone.parameters() if p.requires_grad)


def test_torch_full_kernel_and_graph_model() -> None:
    pytest.importorskip("torch_geometric")
    from tests.backends.torch.test_row_soundness import TwoLayer, karate

    data = karate()
    torch.manual_seed(1)
    model = TwoLayer("gcn", data.num_features).double().eval()
    result = cvcore.measure(model, data, per_layer=True, dtype="float64", kernel="full")
    whole = cvcore.measure(model, data, dtype="float64", kernel="full", implementation="jacobian")
    # the user's module paths (the adapter's wrapper holds the model as `gnn`, left off)
    assert [r.layer for r in result.layers] == ["c1", "c1.lin", "c2", "c2.lin"]
    assert sum(r.trace for r in result.layers) == pytest.approx(whole.trace, rel=1e-12)


def test_jax_layers_sum_and_match_per_sample_gradients() -> None:
    jax = pytest.importorskip("jax")
    flax = pytest.importorskip("flax")
    jnp = jax.numpy
    from flax import linen as nn

    class M(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            return nn.Dense(3)(jnp.tanh(nn.Dense(8)(x)))

    x = np.random.default_rng(0).normal(size=(7, 5))
    from cvcore.backends.jax.setup import x64_scope

    with x64_scope(True):
        model = M()
        variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x))
        variables = jax.tree_util.tree_map(lambda v: v.astype(jnp.float64), variables)
        for impl in ("auto", "jacobian"):
            result = cvcore.measure((model, variables), x, per_layer=True, dtype="float64",
                                    implementation=impl)
            assert [r.layer for r in result.layers] == ["Dense_0", "Dense_1"]
            whole = cvcore.measure((model, variables), x, dtype="float64")
            assert sum(r.trace for r in result.layers) == pytest.approx(whole.trace, rel=1e-12)
            for row in result.layers:
                key = row.layer

                def one(sub: Any, xi: Any, key: str = key) -> Any:
                    p = {"params": {**variables["params"], key: sub}}
                    return model.apply(p, xi[None])[0]

                j = jax.vmap(jax.jacrev(one), in_axes=(None, 0))(variables["params"][key], jnp.asarray(x))
                flat = np.concatenate([np.asarray(v).reshape(7, 3, -1)
                                       for v in jax.tree_util.tree_leaves(j)], axis=2)
                ref = np.einsum("iop,jop->ij", flat, flat) / 3
                assert row.trace == pytest.approx(float(np.trace(ref)), rel=1e-10)
                assert row.entropy == pytest.approx(collective_variables(ref).entropy, rel=1e-9)
                assert row.n_params == flat.shape[2]
    del flax


def test_keras_layers_sum_and_match_the_torch_twin() -> None:
    keras = pytest.importorskip("keras")
    torch.manual_seed(2)
    net = tm.mlp(6, 9, 3).double()
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(9, activation="tanh"),
                              keras.layers.Dense(3)])
    for dense, linear in zip(model.layers, (net[0], net[2])):
        dense.set_weights([linear.weight.detach().numpy().T, linear.bias.detach().numpy()])
    x = np.random.default_rng(3).normal(size=(8, 6))
    ours = cvcore.measure(model, x, per_layer=True, dtype="float64")
    twin = cvcore.measure(net, x, per_layer=True, dtype="float64")
    assert [r.layer for r in ours.layers] == [layer.name for layer in model.layers]
    assert sum(r.trace for r in ours.layers) == pytest.approx(ours.model.trace, rel=1e-12)
    for mine, theirs in zip(ours.layers, twin.layers):
        assert mine.trace == pytest.approx(theirs.trace, rel=1e-9)
        assert mine.entropy == pytest.approx(theirs.entropy, rel=1e-8)
        assert mine.n_params == theirs.n_params


def test_cli_per_layer_json_and_csv(tmp_path: Path) -> None:
    from cvcore.cli.app import make_app
    from typer.testing import CliRunner

    torch.save(tm.digits_mlp(), tmp_path / "m.pt")
    runner = CliRunner()
    args = ["measure", str(tmp_path / "m.pt"), "--data", "digits", "--samples", "15",
            "--dtype", "float64", "--per-layer"]
    result = runner.invoke(make_app(), [*args, "--json", "--csv", str(tmp_path / "l.csv")])
    assert result.exit_code == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert [layer["layer"] for layer in row["layers"]] == ["0", "2"]
    assert sum(layer["trace"] for layer in row["layers"]) == pytest.approx(row["trace"], rel=1e-12)
    with (tmp_path / "l.csv").open() as fh:
        lines = list(csv.DictReader(fh))
    assert [r["layer"] for r in lines] == ["0", "2"]
    assert float(lines[1]["trace"]) == pytest.approx(row["layers"][1]["trace"], rel=1e-12)
    table = runner.invoke(make_app(), args)
    assert table.exit_code == 0 and "per layer" in table.stdout and "share" in table.stdout
    bad = runner.invoke(make_app(), [*args, "--variables", "trace"])
    assert bad.exit_code == 2 and "--per-layer without" in bad.stderr


def test_api_refuses_per_layer_with_variables() -> None:
    with pytest.raises(cvcore.InputError, match="per_layer without variables"):
        cvcore.measure(tm.mlp(), torch.randn(3, 6), per_layer=True, variables=["trace"])




KERAS_ON_JAX = """
import numpy as np, torch, keras, cvcore
from tests import torch_models as tm
assert keras.backend.backend() == "jax"
torch.manual_seed(2)
net = tm.mlp(6, 9, 3).double()
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(9, activation="tanh"),
                          keras.layers.Dense(3)])
for dense, linear in zip(model.layers, (net[0], net[2])):
    dense.set_weights([linear.weight.detach().numpy().T, linear.bias.detach().numpy()])
x = np.random.default_rng(3).normal(size=(8, 6))
ours = cvcore.measure(model, x, per_layer=True, dtype="float64")
twin = cvcore.measure(net, x, per_layer=True, dtype="float64")
assert [r.layer for r in ours.layers] == [layer.name for layer in model.layers], ours.layers
assert abs(sum(r.trace for r in ours.layers) / ours.model.trace - 1) < 1e-12
for mine, theirs in zip(ours.layers, twin.layers):
    assert abs(mine.trace / theirs.trace - 1) < 1e-9, (mine, theirs)
    assert abs(mine.entropy / theirs.entropy - 1) < 1e-8, (mine, theirs)
    assert mine.n_params == theirs.n_params
print("ok")
"""


@pytest.mark.slow
def test_keras_on_jax_layers_match_the_torch_twin() -> None:
    pytest.importorskip("keras")
    pytest.importorskip("jax")
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", KERAS_ON_JAX], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
