"""The estimators give the same numbers as before they moved to ``cvcore/estimators/``.

``tests/data/estimate_reference.json`` holds, as ``float.hex`` strings, values computed
with the code before the move (``python -m tests.core.test_estimate_reference`` rewrites it):
the NumPy core on a fixed kernel, and ``cvcore.estimate`` on a torch and a JAX model,
exact and stochastic, with the kernel's diagonal and with Hutchinson's trace. On the
machine that saved them they agree bit for bit; the tolerance (1e-12 relative) only
allows for another BLAS summing in another order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cvcore
from cvcore.estimate import hutchinson_trace, randomized_topk, slq_entropy

REFERENCE = Path(__file__).parents[1] / "data" / "estimate_reference.json"
FIELDS = ("trace", "trace_stderr", "entropy", "entropy_stderr", "effective_rank",
          "normalized_trace")


def _kernel(d: int = 60) -> np.ndarray:
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.arange(1, d + 1, dtype=np.float64) ** -1.2
    lam[-10:] = 0.0
    return (q * lam) @ q.T


def _numpy_core() -> dict[str, list[float]]:
    k = _kernel()
    mv = lambda v: k @ v
    d = k.shape[0]
    hut = hutchinson_trace(mv, d, probes=16, rng=3)
    top = randomized_topk(mv, d, k=6, oversample=5, power_iters=2, rng=4)
    out = {"hutchinson": [hut.value, hut.stderr],
           "topk": [*top.eigenvalues, *top.residuals]}
    for name, trace, deflation in (("slq-exact-trace", float(np.trace(k)), None),
                                   ("slq-hutchinson", None, None),
                                   ("slq-deflated", float(np.trace(k)), top),
                                   ("slq-deflated-hutchinson", None, top)):
        est = slq_entropy(mv, d, probes=12, steps=15, rng=5, trace=trace, deflation=deflation)
        out[name] = [est.entropy, est.stderr, est.trace, est.trace_stderr, float(est.steps)]
    return out


def _variables(est: Any) -> list[float]:
    return [float(getattr(est, f)) for f in FIELDS] + [float(v) for v in est.top_eigenvalues] \
        + [float(v) for v in est.top_residuals] + [float(est.dim), float(est.steps)]


def _torch_cases() -> dict[str, list[float]]:
    from importlib.resources import files

    from tests.torch_models import digits_mlp

    with files("cvcore").joinpath("data/digits.npz").open("rb") as fh:
        x = np.load(fh)["data"].astype(np.float64)[:30]
    model = digits_mlp()
    common = {"dtype": "float64", "top_k": 4, "probes": 8, "steps": 12, "seed": 11}
    return {
        "torch-exact": _variables(cvcore.estimate(model, x, **common)),
        "torch-full-diagonal": _variables(cvcore.estimate(
            model, x, method="stochastic", kernel="full", **common)),
        "torch-full-hutchinson": _variables(cvcore.estimate(
            model, x, method="stochastic", kernel="full", trace_estimator="hutchinson",
            **common)),
        "torch-traced-plain": _variables(cvcore.estimate(
            model, x, method="stochastic", deflate=False, **common)),
        "torch-auto-stochastic": _variables(cvcore.estimate(
            model, x, max_exact_dim=20, **common)),
    }


def _jax_cases() -> dict[str, list[float]]:
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    params = {"w1": jnp.asarray(rng.standard_normal((5, 9))), "b1": jnp.full((9,), 0.1),
              "w2": jnp.asarray(rng.standard_normal((9, 3)) / 2), "b2": jnp.zeros(3)}

    def apply(p: Any, x: Any) -> Any:
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    x = rng.standard_normal((25, 5))
    common = {"dtype": "float64", "top_k": 3, "probes": 8, "steps": 10, "seed": 5}
    del jax
    return {
        "jax-exact": _variables(cvcore.estimate((apply, params), x, method="exact", **common)),
        "jax-full-diagonal": _variables(cvcore.estimate(
            (apply, params), x, method="stochastic", kernel="full", **common)),
        "jax-traced-hutchinson": _variables(cvcore.estimate(
            (apply, params), x, method="stochastic", trace_estimator="hutchinson", **common)),
    }


def _compute() -> dict[str, list[float]]:
    return {**_numpy_core(), **_torch_cases(), **_jax_cases()}


def _saved() -> dict[str, list[float]]:
    data = json.loads(REFERENCE.read_text())
    return {k: [float.fromhex(v) for v in vs] for k, vs in data.items()}


def test_numpy_core_numbers_unchanged() -> None:
    saved = _saved()
    for name, values in _numpy_core().items():
        np.testing.assert_allclose(values, saved[name], rtol=1e-12, atol=1e-15, err_msg=name)


@pytest.mark.parametrize("backend_name", ["torch", "jax"], indirect=True)
def test_backend_estimates_unchanged(backend_name: str) -> None:
    saved = _saved()
    cases = {"torch": _torch_cases, "jax": _jax_cases}[backend_name]
    for name, values in cases().items():
        np.testing.assert_allclose(values, saved[name], rtol=1e-12, atol=1e-15, err_msg=name)


if __name__ == "__main__":
    REFERENCE.write_text(json.dumps({k: [float(v).hex() for v in vs]
                                     for k, vs in _compute().items()}, indent=1) + "\n")
