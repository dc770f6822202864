"""Keras MobileNetV2 (2.27M parameters, 96×96×3 inputs, 10 logits): cvcore against the
TensorFlow recipe, time and peak memory.

Usage::

    python benchmarks/keras_mobilenet.py --n 16
    python benchmarks/keras_mobilenet.py --n 16 --methods tf,cvcore,cvcore-trace --keras-backend jax

Each method runs in its own process (so that peak memory is that method's alone) on the
same weights (``keras.utils.set_random_seed(0)``) and inputs, with
``KERAS_BACKEND=--keras-backend``:

* ``tf``: the TensorFlow recipe, one ``tf.GradientTape.jacobian`` of one sample's 10
  outputs (``experimental_use_pfor=True``) per sample in a Python loop, in one
  ``tf.function``, concatenated; the Gram matrix in NumPy (``--keras-backend tensorflow``
  only).
* ``cvcore``: ``cvcore.ntk(model, x)`` (traced kernel, float32).
* ``cvcore-trace``: ``cvcore.measure(model, x, variables=["trace"])``.

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


def _model() -> object:
    import keras

    keras.utils.set_random_seed(0)
    return keras.applications.MobileNetV2(weights=None, input_shape=SHAPE, classes=10,
                                          classifier_activation=None)


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
    sys.path.insert(0, str(HERE))
    from peak_rss import PeakRSS

    import cvcore

    model = _model()
    x = _inputs(n)
    if method == "tf":
        _tf_recipe(model, x[:1])  # trace the tf.function
    with PeakRSS() as rss:
        start, cpu = time.perf_counter(), time.process_time()
        if method == "tf":
            result = _tf_recipe(model, x)
        elif method == "cvcore":
            result = np.asarray(cvcore.ntk(model, x))
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
    p.add_argument("--keras-backend", default="tensorflow")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    env = {**os.environ, "KERAS_BACKEND": args.keras_backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    kernels: dict[str, np.ndarray] = {}
    print(f"MobileNetV2 {SHAPE}, 10 classes, N = {args.n}, float32, traced, "
          f"KERAS_BACKEND={args.keras_backend}")
    print(f"{'method':<14} {'seconds':>8} {'CPU s':>8} {'peak MB':>8} {'rel.err':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            out = os.path.join(tmp, f"{method}.npy")
            done = subprocess.run([sys.executable, __file__, "--child", method, str(args.n), out],
                                  check=False, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{method:<14} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            kernels[method] = np.load(out)
            err = ""
            if "tf" in kernels and method != "tf":
                ref = kernels["tf"] if method == "cvcore" else np.asarray([np.trace(kernels["tf"])])
                err = f"{np.abs(kernels[method] - ref).max() / np.abs(ref).max():.1e}"
            noise = sum("while_loop" in line for line in done.stderr.splitlines())
            print(f"{method:<14} {row['seconds']:8.1f} {row['cpu']:8.1f} {row['peak'] / 2**20:8.0f} "
                  f"{err:>9}"
                  + (f"  ({noise} while_loop warnings)" if noise else ""), flush=True)


if __name__ == "__main__":
    main()
