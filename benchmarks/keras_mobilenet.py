"""Keras MobileNetV2 (2.27M parameters, 96×96×3 inputs, 10 logits): cvcore against the
TensorFlow recipe, time and peak memory.

Usage::

    python benchmarks/keras_mobilenet.py --n 16
    python benchmarks/keras_mobilenet.py --n 16 --methods tf,jax-cvcore,jax-cvcore-trace

Each method runs in its own process (so that peak memory is that method's alone) on the
same weights (the first method's ``keras.utils.set_random_seed(0)`` initialisation,
saved and loaded by the others) and inputs, with ``KERAS_BACKEND=tensorflow``, or
``jax`` / ``torch`` for a method prefixed ``jax-`` / ``torch-``:

* ``tf``: the TensorFlow recipe, one ``tf.GradientTape.jacobian`` of one sample's 10
  outputs (``experimental_use_pfor=True``) per sample in a Python loop, in one
  ``tf.function``, concatenated; the Gram matrix in NumPy.
* ``cvcore``: ``cvcore.ntk(model, x)`` (traced kernel, float32).
* ``cvcore-trace``: ``cvcore.measure(model, x, variables=["trace"])``.
* ``cvcore-jacobian``, ``cvcore-structured``: ``cvcore.ntk`` with that ``implementation=``
  (on ``torch-``: the Jacobian path of ``stateless_call``, or the torch structured engine).
* ``cvcore-again``, ``cvcore-trace-again``: the same, timing a second call on the same
  model after a first one (what a training loop measuring every epoch sees: the traced
  functions are reused, see docs/backend-tensorflow.md).

Columns: wall time of the whole call (``tf``: after one warm-up call on one sample that
traces the ``tf.function``; cvcore's calls include everything they build), the CPU time
of the process during it (all threads; less sensitive to other load on the machine than
the wall time), the peak rise
of the process's resident set during it (sampled every 2 ms), and ``rel.err``
``max|K − K_tf| / max|K_tf|`` against the ``tf`` method's kernel (trace: relative error of
the trace).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHAPE = (96, 96, 3)


def _model(weights: str) -> object:
    """MobileNetV2 with seeded weights, saved to ``weights`` by the first method and read
    back by the others (the Keras backends initialise differently)."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=SHAPE, classes=10,
                                           classifier_activation=None)
    if os.path.exists(weights):
        with np.load(weights) as saved:
            model.set_weights([saved[f"w{i}"] for i in range(len(saved.files))])
    else:
        np.savez(weights, **{f"w{i}": w for i, w in enumerate(model.get_weights())})
    return model


def _inputs(n: int) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, *SHAPE)).astype(np.float32)


def _tf_recipe(model: object, x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    variables = model.trainable_variables  # type: ignore[attr-defined]

    @tf.function(reduce_retracing=True)
    def one(xi: object) -> object:
        with tf.GradientTape() as tape:
            out = tf.reshape(model(xi, training=False), [-1])  # type: ignore[operator]
        jac = tape.jacobian(out, variables, experimental_use_pfor=True)
        return tf.concat([tf.reshape(j, (j.shape[0], -1)) for j in jac], axis=1)

    rows = [one(tf.constant(x[i:i + 1])).numpy() for i in range(len(x))]
    j = np.stack(rows)  # (N, O, P)
    return np.einsum("iop,jop->ij", j, j) / j.shape[1]


def child(method: str, n: int, out: str) -> None:
    method = method.removeprefix("jax-").removeprefix("torch-")
    sys.path.insert(0, str(HERE))
    from peak_rss import PeakRSS

    import cvcore

    model = _model(os.path.join(os.path.dirname(out), "weights.npz"))
    x = _inputs(n)
    again = method.endswith("-again")
    method = method.removesuffix("-again")
    if method == "tf":
        _tf_recipe(model, x[:1])  # trace the tf.function
    elif again:
        cvcore.ntk(model, x) if method == "cvcore" else cvcore.measure(model, x, variables=["trace"])
    with PeakRSS() as rss:
        start, cpu = time.perf_counter(), time.process_time()
        if method == "tf":
            result = _tf_recipe(model, x)
        elif method == "cvcore":
            result = np.asarray(cvcore.ntk(model, x))
        elif method in ("cvcore-jacobian", "cvcore-structured"):
            result = np.asarray(cvcore.ntk(model, x, implementation=method.split("-")[1]))
        else:
            result = np.asarray([cvcore.measure(model, x, variables=["trace"]).trace])
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    np.save(out, result)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "peak": rss.peak - rss.base,
                      "params": int(sum(np.prod(v.shape) for v in model.trainable_variables))}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--methods", default="tf,cvcore,cvcore-trace")
    p.add_argument("--label", default="", help="a prefix for the method column")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    kernels: dict[str, np.ndarray] = {}
    print(f"MobileNetV2 {SHAPE}, 10 classes, N = {args.n}, float32, traced")
    print(f"{'method':<20} {'seconds':>8} {'CPU s':>8} {'peak MB':>8} {'rel.err':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            out = os.path.join(tmp, f"{method}.npy")
            backend = method.split("-")[0] if method.startswith(("jax-", "torch-")) else "tensorflow"
            env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
            done = subprocess.run([sys.executable, __file__, "--child", method, str(args.n), out],
                                  check=False, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{args.label + method:<20} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            kernels[method] = np.load(out)
            err = ""
            if "tf" in kernels and method != "tf":
                trace = method.removesuffix("-again").endswith("trace")
                ref = np.asarray([np.trace(kernels["tf"])]) if trace else kernels["tf"]
                err = f"{np.abs(kernels[method] - ref).max() / np.abs(ref).max():.1e}"
            noise = sum("while_loop" in line for line in done.stderr.splitlines())
            print(f"{args.label + method:<20} {row['seconds']:8.1f} {row['cpu']:8.1f} {row['peak'] / 2**20:8.0f} "
                  f"{err:>9}"
                  + (f"  ({noise} while_loop warnings)" if noise else ""), flush=True)


if __name__ == "__main__":
    main()
