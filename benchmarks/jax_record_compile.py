"""Compilations and seconds per Recorder record for a JAX model: (apply_fn, params) of an
Optax loop and a Flax NNX module, 10 records of new weights each.

    .venv/bin/python benchmarks/jax_record_compile.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import cvcore
from cvcore.integrations.jax import compilations

RECORDS = 10
X = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
Y = np.random.default_rng(1).normal(size=(64, 2)).astype(np.float32)
PROBE = X[:32]


def apply_fn(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.l1, self.l2 = nnx.Linear(8, 64, rngs=rngs), nnx.Linear(64, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def report(name: str, rows: list[tuple[int, int, float]]) -> None:
    first, rest = rows[0], rows[1:]
    print(f"{name:16s} first record: {first[0]} compilations, {first[1]} traces, "
          f"{first[2] * 1e3:.0f} ms; next {len(rest)}: {sum(r[0] for r in rest)} compilations, "
          f"{sum(r[1] for r in rest)} traces, median {np.median([r[2] for r in rest]) * 1e3:.1f} ms")


def main() -> None:
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = {"w1": jax.random.normal(k1, (8, 64)) * 0.3, "b1": jnp.zeros(64),
              "w2": jax.random.normal(k2, (64, 2)) * 0.1, "b2": jnp.zeros(2)}
    tx = optax.adam(1e-2)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: ((apply_fn(p, X) - Y) ** 2).mean())(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    rec = cvcore.Recorder(PROBE, variables=["entropy", "trace"])
    rows = []
    for i in range(RECORDS):
        with compilations() as seen:
            t = time.perf_counter()
            rec.record(i, (apply_fn, params))
            rows.append((seen.compiled, seen.traced, time.perf_counter() - t))
        params, state = step(params, state)
    report("(apply_fn, params)", rows)

    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def nnx_step(model, opt):
        grads = nnx.grad(lambda m: ((m(X) - Y) ** 2).mean())(model)
        opt.update(model, grads)

    rec = cvcore.Recorder(PROBE, variables=["entropy", "trace"])
    rows = []
    for i in range(RECORDS):
        with compilations() as seen:
            t = time.perf_counter()
            rec.record(i, model)
            rows.append((seen.compiled, seen.traced, time.perf_counter() - t))
        nnx_step(model, opt)
    report("nnx.Module", rows)


if __name__ == "__main__":
    main()
