"""cvcore against neural-tangents itself, where its separate environment exists.

neural-tangents 0.6.5 needs JAX 0.4.25 and NumPy 1 (``benchmarks/neural_tangents_env.sh``
makes that environment); this test runs a script in it on the same plain-JAX model,
weights and inputs, and compares every array with cvcore's, float64 on both sides:
cross kernels with traced, diagonal and kept output axes, per-sample kernels, ``vmap_axes``,
the NNGP, the NTK–vector product and ``predict.gradient_descent_mse``. Skipped without
that environment (``CVCORE_NT_PYTHON`` names its python, else ``.venv-nt`` is tried).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import cvcore
from tests.tolerance import rel_error

ROOT = Path(__file__).resolve().parents[2]
NT_PYTHON = os.environ.get("CVCORE_NT_PYTHON", str(ROOT / ".venv-nt" / "bin" / "python"))

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path(NT_PYTHON).exists(),
                                 reason="no neural-tangents environment (CVCORE_NT_PYTHON)")]

MODEL = """
import jax.numpy as jnp

def conv_fn(p, x):              # (N, H, W, 2) -> (N, H, W, 3)
    return jnp.tanh(x @ p["a"]) @ p["b"]

def flat_fn(p, x):              # (N, 4) -> (N, 3)
    return jnp.tanh(x @ p["c"]) @ p["d"]

def time_major(p, x):           # (4, N) -> (3, N)
    return flat_fn(p, x.T).T
"""

AXES = {"chan": ((-1,), ()), "none": ((), ()), "chan_diag": ((-1,), (1, 2)),
        "all": ((1, 2, 3), ()), "w_diag": ((), (2,))}

PEER = MODEL + """
import sys, numpy as np, jax
jax.config.update("jax_enable_x64", True)
import neural_tangents as nt
d = dict(np.load(sys.argv[1]))
p = {k: jnp.asarray(d[k]) for k in "abcd"}
out = {}
AXES = %r
for name, (t, g) in AXES.items():
    out["ntk_" + name] = nt.empirical_ntk_fn(conv_fn, trace_axes=t, diagonal_axes=g)(d["x1"], d["x2"], p)
out["per_sample"] = nt.empirical_ntk_fn(conv_fn, trace_axes=(-1,), diagonal_axes=(0,))(d["x1"], None, p)
out["vmap"] = nt.empirical_ntk_fn(time_major, trace_axes=(0,), vmap_axes=(1, 1, {}))(d["u1"].T, d["u2"].T, p)
out["vmap_kept"] = nt.empirical_ntk_fn(time_major, trace_axes=(), vmap_axes=(1, 1, {}))(d["u1"].T, d["u2"].T, p)
out["nngp"] = nt.empirical_nngp_fn(conv_fn)(d["x1"], d["x2"], p)
out["nngp_diag"] = nt.empirical_nngp_fn(conv_fn, trace_axes=(-1,), diagonal_axes=(1, 2))(d["x1"], d["x2"], p)
out["vp"] = nt.empirical_ntk_vp_fn(conv_fn, d["x1"], d["x2"], p)(d["ct"])
for kind, t in (("full", ()), ("traced", (-1,))):
    k_tt = nt.empirical_ntk_fn(flat_fn, trace_axes=t)(d["u1"], None, p)
    k_st = nt.empirical_ntk_fn(flat_fn, trace_axes=t)(d["u2"], d["u1"], p)
    f1, f2 = flat_fn(p, d["u1"]), flat_fn(p, d["u2"])
    fn = nt.predict.gradient_descent_mse(k_tt, d["y"], learning_rate=0.7, diag_reg=0.1, trace_axes=t)
    tr, te = fn(np.array([0.0, 5.0, 40.0]), f1, f2, k_st)
    out["train_" + kind], out["test_" + kind] = tr, te
np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in out.items()})
""".replace("%r", repr(AXES))


def test_cvcore_matches_neural_tangents(tmp_path: Path) -> None:
    pytest.importorskip("jax")
    rng = np.random.default_rng(2)
    data = {"a": rng.normal(size=(2, 8)) / 2, "b": rng.normal(size=(8, 3)) / 3,
            "c": rng.normal(size=(4, 16)) / 2, "d": rng.normal(size=(16, 3)) / 4,
            "x1": rng.normal(size=(3, 2, 3, 2)), "x2": rng.normal(size=(2, 2, 3, 2)),
            "u1": rng.normal(size=(6, 4)), "u2": rng.normal(size=(3, 4)),
            "ct": rng.normal(size=(2, 2, 3, 3)), "y": rng.normal(size=(6, 3))}
    np.savez(tmp_path / "in.npz", **data)
    script = tmp_path / "peer.py"
    script.write_text(PEER, encoding="utf-8")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([NT_PYTHON, str(script), str(tmp_path / "in.npz"),
                           str(tmp_path / "out.npz")], capture_output=True, text=True,
                          timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = dict(np.load(tmp_path / "out.npz"))

    namespace: dict[str, object] = {}
    exec(MODEL, namespace)  # noqa: S102 - the same plain-JAX model as the peer's
    p = {k: data[k] for k in "abcd"}  # NumPy float64: no float32 rounding on the way in
    conv, flat, tm = ((namespace[n], p) for n in ("conv_fn", "flat_fn", "time_major"))
    f64 = {"dtype": "float64"}
    for name, (t, g) in AXES.items():
        ours = cvcore.ntk(conv, data["x1"], data["x2"], trace_axes=t, diagonal_axes=g, **f64)
        assert ours.shape == theirs["ntk_" + name].shape, name
        assert rel_error(ours, theirs["ntk_" + name]) < 1e-10, name
    ours = cvcore.ntk(conv, data["x1"], trace_axes=(-1,), diagonal_axes=(0,), **f64)
    assert rel_error(ours, theirs["per_sample"]) < 1e-10
    # the axes count over the user's output (C, N), and the result follows it: (C, C, N, N)
    ours = cvcore.ntk(tm, data["u1"].T, data["u2"].T, trace_axes=(0,), vmap_axes=(1, 1, {}), **f64)
    assert rel_error(ours, theirs["vmap"]) < 1e-10
    ours = cvcore.ntk(tm, data["u1"].T, data["u2"].T, trace_axes=(), vmap_axes=(1, 1, {}), **f64)
    assert ours.shape == theirs["vmap_kept"].shape == (3, 3, 6, 3)
    assert rel_error(ours, theirs["vmap_kept"]) < 1e-10
    # neural-tangents' default trace_axes=(-1,) is named here: cvcore's default is its
    # traced convention (every output axis averaged)
    ours = cvcore.nngp(conv, data["x1"], data["x2"], trace_axes=(-1,), **f64)
    assert rel_error(ours, theirs["nngp"]) < 1e-10
    assert rel_error(cvcore.nngp(conv, data["x1"], data["x2"], **f64),
                     np.einsum(
                         "ijhhww->ij", theirs["nngp"]) / 6) < 1e-10
    ours = cvcore.nngp(conv, data["x1"], data["x2"], trace_axes=(-1,), diagonal_axes=(1, 2), **f64)
    assert rel_error(ours, theirs["nngp_diag"]) < 1e-10
    ours = cvcore.kernel_vector_product(conv, data["x1"], data["ct"], data["x2"], kernel="full",
                                        **f64)
    assert rel_error(ours, theirs["vp"]) < 1e-10
    f1 = np.tanh(data["u1"] @ data["c"]) @ data["d"]
    f2 = np.tanh(data["u2"] @ data["c"]) @ data["d"]
    for kind in ("full", "traced"):
        k_tt = cvcore.ntk(flat, data["u1"], kernel=kind, **f64)
        k_st = cvcore.ntk(flat, data["u2"], data["u1"], kernel=kind, **f64)
        fn = cvcore.gradient_descent_mse(k_tt, data["y"], learning_rate=0.7, diag_reg=0.1)
        train, test = fn([0.0, 5.0, 40.0], f1, f2, k_st)
        assert rel_error(train, theirs["train_" + kind]) < 1e-9, kind
        assert rel_error(test, theirs["test_" + kind]) < 1e-9, kind
