"""Four ways to compute MobileNetV2's per-sample GradientTape Jacobians on TensorFlow:
first (tracing) and second call, for docs/backend-tensorflow.md's vectorization table.

Usage::

    python benchmarks/keras_pfor_forms.py FORM N     # FORM: vmap, one, mapfn, grads

* ``vmap``: ``tape.jacobian`` (pfor over the 10 outputs) of one sample inside
  ``tf.vectorized_map`` over the N samples, one ``tf.function``;
* ``one``: the same one-sample Jacobian in a ``tf.function`` traced once, called per
  sample from Python (what cvcore's ``loop`` strategy does);
* ``mapfn``: the one-sample Jacobian inside ``tf.map_fn`` over the samples;
* ``grads``: one ``tape.gradient`` per output in a Python loop (no pfor), per sample.

All parameters at once, float32, MobileNetV2 at 96×96×3 with 10 outputs.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def main() -> None:
    import keras
    import tensorflow as tf

    form, n = sys.argv[1], int(sys.argv[2])
    keras.utils.set_random_seed(0)
    m = keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3), classes=10,
                                       classifier_activation=None)
    theta = [tf.convert_to_tensor(v.value) for v in m.trainable_variables]
    fixed = [tf.convert_to_tensor(v.value) for v in m.non_trainable_variables]
    x = tf.constant(np.random.default_rng(1).normal(size=(n, 96, 96, 3)).astype(np.float32))

    def apply(b: object) -> object:
        return m.stateless_call(theta, fixed, b, training=False)[0]

    def jac1(xi: object) -> object:
        with tf.GradientTape(watch_accessed_variables=False) as t:
            t.watch(theta)
            out = apply(xi)[0]
        js = t.jacobian(out, theta, experimental_use_pfor=True,
                        unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.concat([tf.reshape(j, (10, -1)) for j in js], 1)

    def grads1(xi: object) -> object:
        with tf.GradientTape(persistent=True, watch_accessed_variables=False) as t:
            t.watch(theta)
            out = apply(xi)[0]
            outs = [out[o] for o in range(10)]
        rows = []
        for o in range(10):
            gs = t.gradient(outs[o], theta, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            rows.append(tf.concat([tf.reshape(g, (-1,)) for g in gs], 0))
        return tf.stack(rows)

    if form == "vmap":
        f = tf.function(lambda b: tf.vectorized_map(lambda xi: jac1(xi[None]), b))
    elif form == "mapfn":
        f = tf.function(lambda b: tf.map_fn(lambda xi: jac1(xi[None]), b,
                                            fn_output_signature=tf.float32))
    else:
        g = tf.function(jac1 if form == "one" else grads1)

        def f(b: object) -> object:
            return tf.stack([g(b[i:i + 1]) for i in range(n)])

    t0 = time.perf_counter()
    f(x)
    t1 = time.perf_counter()
    r = f(x)
    t2 = time.perf_counter()
    print(f"{form} N={n}: first call {t1 - t0:.2f} s, second {t2 - t1:.2f} s, "
          f"sum of squares {float(tf.reduce_sum(r * r)):.6g}")


if __name__ == "__main__":
    main()
