"""JAX through the Recorder: an Optax loop on ``(apply_fn, params)`` and a Flax NNX model
with dropout trained by ``nnx.Optimizer``; the recorded steps, values equal to a direct
``cvcore.measure``, training unchanged, and no XLA compilation after the first record."""

from __future__ import annotations

import numpy as np
import pytest

import cvcore

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp

from cvcore.integrations.jax import compilations
from tests.integration_cli import report_and_plot

VARS = ["entropy", "trace"]
G = np.random.default_rng(0)
X = G.normal(size=(16, 4)).astype(np.float32)
Y = G.normal(size=(16, 2)).astype(np.float32)
PROBE = np.random.default_rng(5).normal(size=(10, 4)).astype(np.float32)


def apply_fn(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def optax_run(rec=None, steps=6):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"w1": jax.random.normal(k1, (4, 16)) * 0.5, "b1": jnp.zeros(16),
              "w2": jax.random.normal(k2, (16, 2)) * 0.3, "b2": jnp.zeros(2)}
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: ((apply_fn(p, X) - Y) ** 2).mean())(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    seen, loss = [], None
    for step in range(steps + 1):
        if rec is not None:
            with compilations() as c:
                rec.record(step, (apply_fn, params), loss=loss)
            seen.append(c.compiled)
        if step < steps:
            params, opt_state, loss = train_step(params, opt_state)
    return params, seen


def test_optax_apply_fn_params(tmp_path):
    rec = cvcore.Recorder(PROBE, every=2, variables=VARS, sink=tmp_path / "optax.db")
    params, compiled = optax_run(rec)
    plain, _ = optax_run()
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(plain)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    records = rec.records()
    rec.close()
    assert [r.step for r in records] == [0, 2, 4, 6]
    assert records[0].loss is None and records[1].loss is not None
    direct = cvcore.measure((apply_fn, params), PROBE, variables=VARS)
    assert records[-1].get("trace") == pytest.approx(direct.trace, rel=1e-12)
    assert records[-1].get("entropy") == pytest.approx(direct.entropy, rel=1e-12)
    assert compiled[0] > 0 and compiled[1:] == [0] * 6  # skipped steps compile nothing either
    report_and_plot(tmp_path / "optax.db", tmp_path)


def nnx_run(rec=None, steps=4):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 16, rngs=rngs)
            self.drop = nnx.Dropout(0.2, rngs=rngs)
            self.l2 = nnx.Linear(16, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(self.drop(jnp.tanh(self.l1(x))))

    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: ((m(X) - Y) ** 2).mean())(model)
        opt.update(model, grads)
        return loss

    compiled = []
    for step in range(steps + 1):
        if rec is not None:
            with compilations() as c:
                rec.record(step, model)
            compiled.append(c.compiled)
        if step < steps:
            train_step(model, opt)
    return model, compiled


def test_flax_nnx_module():
    pytest.importorskip("flax")
    from flax import nnx

    rec = cvcore.Recorder(PROBE, variables=VARS)
    model, compiled = nnx_run(rec)
    plain, _ = nnx_run()
    def arrays(m):  # parameters and the dropout's RNG key and counter
        return [np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key)
                           else v) for v in jax.tree.leaves(nnx.state(m))]

    mine, theirs = arrays(model), arrays(plain)
    assert len(mine) == len(theirs) > 4
    for a, b in zip(mine, theirs):
        assert np.array_equal(a, b)
    records = rec.records()
    assert [r.step for r in records] == [0, 1, 2, 3, 4]
    direct = cvcore.measure(model, PROBE, variables=VARS)
    assert records[-1].get("trace") == pytest.approx(direct.trace, rel=1e-12)
    assert records[-1].get("entropy") == pytest.approx(direct.entropy, rel=1e-12)
    assert compiled[0] > 0 and compiled[1:] == [0] * 4


def test_graph_network_nodes_in_an_optax_loop():
    """A two-layer GCN in JAX on a fixed graph (the Karate Club), its samples the node
    indices: each node's output is computed on the whole graph. Recorded with every=2 in
    an Optax loop, the final model taken by ``record_final``; the last record against a
    float64 kernel from ``jax.jacrev``."""
    pytest.importorskip("torch_geometric")
    from torch_geometric.datasets import KarateClub

    from cvcore.integrations.recording import record_final

    g = KarateClub()[0]
    n = g.num_nodes
    a = np.eye(n, dtype=np.float32)
    a[g.edge_index[0].numpy(), g.edge_index[1].numpy()] = 1
    d = a.sum(1)
    adj, feats = jnp.asarray(a / np.sqrt(d[:, None] * d[None, :])), jnp.asarray(g.x.numpy())
    labels = jnp.asarray(g.y.numpy())

    def gcn(p, idx):
        return (adj @ jnp.tanh(adj @ feats @ p["w1"]) @ p["w2"])[idx]

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"w1": jax.random.normal(k1, (n, 8)) * 0.3, "w2": jax.random.normal(k2, (8, 4)) * 0.3}
    tx = optax.adam(5e-2)
    opt_state = tx.init(params)
    nodes = np.arange(n)

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(gcn(p, nodes), labels).mean()

    rec = cvcore.Recorder(nodes, every=2, variables=VARS)
    loss = None
    for step in range(5):
        rec.record(step, (gcn, params), loss=loss)
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state)
        params = optax.apply_updates(params, updates)
    record_final(rec, 5, (gcn, params), loss=loss)
    assert [r.step for r in rec.records()] == [0, 2, 4, 5]
    jac = jax.jacrev(lambda q: gcn(q, nodes))(params)
    rows = np.concatenate([np.asarray(v, dtype=np.float64).reshape(n, 4, -1)
                           for v in jac.values()], axis=2)
    kernel = np.einsum("iop,jop->ij", rows, rows) / 4
    reference = cvcore.collective_variables(kernel)
    last = rec.records()[-1]
    assert last.get("trace") == pytest.approx(reference.trace, rel=1e-5)
    assert last.get("entropy") == pytest.approx(reference.entropy, rel=1e-4)


def test_pytorch_geometric_probe_with_a_jax_model_is_one_line():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Data

    graph = Data(x=torch.randn(4, 3), edge_index=torch.tensor([[0, 1], [1, 2]]))
    rec = cvcore.Recorder(graph)  # the model is known at the first record
    params = {"w": jnp.ones((3, 2))}
    with pytest.raises(cvcore.errors.InputError, match="got Data$"):
        rec.record(0, (lambda p, x: x @ p["w"], params))
