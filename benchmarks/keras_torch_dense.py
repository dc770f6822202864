"""A wide Keras Dense MLP on the torch Keras backend: the torch structured engine against
``vmap(jacrev)`` of ``stateless_call``, process CPU time and wall time of one call each.

Usage::

    KERAS_BACKEND=torch python benchmarks/keras_torch_dense.py jacobian structured auto

Keras 784-1024-1024-10 (tanh), N = 64 random inputs, float32, traced kernel; one warm-up
call on two samples first. ``rel`` is ``max|K − K_first| / max|K_first|`` against the
first implementation named.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

os.environ.setdefault("KERAS_BACKEND", "torch")


def main() -> None:
    import keras

    import cvcore

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(1024, activation="tanh"),
                              keras.layers.Dense(1024, activation="tanh"), keras.layers.Dense(10)])
    x = np.random.default_rng(1).normal(size=(64, 784)).astype(np.float32)
    cvcore.ntk(model, x[:2])
    first = None
    for impl in sys.argv[1:] or ["jacobian", "structured", "auto"]:
        cpu, wall = time.process_time(), time.perf_counter()
        kernel = np.asarray(cvcore.ntk(model, x, implementation=impl))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        first = kernel if first is None else first
        err = float(np.abs(kernel - first).max() / np.abs(first).max())
        print(f"{impl:<12} cpu {cpu:6.2f} s  wall {wall:6.2f} s  rel {err:.1e}")


if __name__ == "__main__":
    main()
