"""TensorFlow ports of benchmarks/run.py's five models, with the torch models' weights.

Each port is a batched ``apply_fn(params, x)`` on TensorFlow tensors computing the same
function as run.py's torch model (see benchmarks/jax_models.py for the JAX ports, whose
``params_from_state`` gives the params tree used here too: the torch ``state_dict``
nested on its dots, torch layouts). TensorFlow's CPU convolutions and pooling take NHWC
only, so the CNN transposes torch's NCHW input to NHWC, its ``OIHW`` kernels to ``HWIO``,
and back to NCHW before flattening, which keeps torch's flatten order.

TensorFlow is imported inside the functions::

    apply_fn, params = port("gnn", {k: v.numpy() for k, v in m.state_dict().items()})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from jax_models import HEADS, LAYER_NORM_EPS, bind, params_from_state, sequential, stacked

Params = dict[str, Any]
ApplyFn = Callable[[Params, Any], Any]


def _linear(p: Params, x: Any) -> Any:
    """``nn.Linear`` on the last axis of ``x`` (any rank), torch ``(out, in)`` weight.

    An einsum, not a broadcasting ``matmul``: the latter, under pfor inside
    ``vectorized_map``, crashes TensorFlow 2.21's oneDNN CPU kernels now and then."""
    import tensorflow as tf

    return tf.einsum("...i,oi->...o", x, p["weight"]) + p["bias"]


def mlp_apply(p: Params, x: Any) -> Any:
    """run.py's MLP: Linear layers with tanh between them."""
    import tensorflow as tf

    return stacked(p, x, _linear, tf.tanh)


def cnn_apply(p: Params, x: Any) -> Any:
    """run.py's CNN on NCHW ``x``, computed in NHWC (TensorFlow's CPU layout)."""
    import tensorflow as tf

    *convs, head = sequential(p)
    h = tf.transpose(x, (0, 2, 3, 1))
    for conv in convs:
        kernel = tf.transpose(conv["weight"], (2, 3, 1, 0))  # OIHW -> HWIO
        # "SAME" is torch's padding=1 for a 3×3 kernel at stride 1 (explicit paddings
        # have no pfor rule for their filter gradient)
        h = tf.nn.conv2d(h, kernel, strides=1, padding="SAME")
        h = tf.nn.max_pool2d(tf.nn.relu(h + conv["bias"]), 2, 2, "VALID")
    h = tf.transpose(h, (0, 3, 1, 2))  # back to NCHW: torch's flatten order
    return _linear(head, tf.reshape(h, (tf.shape(h)[0], -1)))


def _layer_norm(p: Params, x: Any) -> Any:
    """``nn.LayerNorm`` over the last axis (biased variance, ``LAYER_NORM_EPS``)."""
    import tensorflow as tf

    mean = tf.reduce_mean(x, -1, keepdims=True)
    var = tf.reduce_mean(tf.square(x - mean), -1, keepdims=True)
    return (x - mean) / tf.sqrt(var + LAYER_NORM_EPS) * p["weight"] + p["bias"]


def _self_attention(p: Params, h: Any) -> Any:
    """``nn.MultiheadAttention(d, HEADS, batch_first=True)(h, h, h)[0]`` (no dropout)."""
    import tensorflow as tf

    d = int(h.shape[-1])
    qkv = _linear({"weight": p["in_proj_weight"], "bias": p["in_proj_bias"]}, h)

    def heads(t: Any) -> Any:  # (N, T, d) -> (N, HEADS, T, d / HEADS)
        return tf.transpose(tf.reshape(t, (tf.shape(t)[0], -1, HEADS, d // HEADS)), (0, 2, 1, 3))

    q, k, v = (heads(qkv[..., i * d:(i + 1) * d]) for i in range(3))
    weights = tf.nn.softmax(tf.linalg.matmul(q, k, transpose_b=True) / math.sqrt(d // HEADS))
    out = tf.transpose(tf.linalg.matmul(weights, v), (0, 2, 1, 3))
    return _linear(p["out_proj"], tf.reshape(out, tf.shape(h)))


def _gelu(x: Any) -> Any:
    """``nn.GELU()``, exact: ``x (1 + erf(x / √2)) / 2`` (``tf.nn.gelu(approximate=False)``
    is off by ~1e-9 relative in float64)."""
    import tensorflow as tf

    return 0.5 * x * (1 + tf.math.erf(x / math.sqrt(2)))


def transformer_apply(p: Params, x: Any) -> Any:
    """run.py's ``TransformerBlock``: pre-norm attention and exact-GELU MLP, residuals,
    head on the mean over tokens."""
    import tensorflow as tf

    x = x + _self_attention(p["attn"], _layer_norm(p["n1"], x))
    fc1, fc2 = sequential(p["mlp"])
    x = x + _linear(fc2, _gelu(_linear(fc1, _layer_norm(p["n2"], x))))
    return _linear(p["head"], tf.reduce_mean(x, 1))


def gnn_apply(p: Params, x: Any, adj: Any) -> Any:
    """run.py's ``DenseGNN``: ``relu(msg(A h) + self(h))`` twice, head on the node mean."""
    import tensorflow as tf

    a = tf.constant(adj, x.dtype)
    h = tf.nn.relu(_linear(p["msg1"], tf.einsum("ts,nsi->nti", a, x)) + _linear(p["self1"], x))
    h = tf.nn.relu(_linear(p["msg2"], tf.einsum("ts,nsi->nti", a, h)) + _linear(p["self2"], h))
    return _linear(p["head"], tf.reduce_mean(h, 1))


#: The TensorFlow apply functions, by model kind.
APPLY: dict[str, Callable[..., Any]] = {"mlp": mlp_apply, "cnn": cnn_apply,
                                        "transformer": transformer_apply, "gnn": gnn_apply}


def port(model: str, state: Mapping[str, np.ndarray]) -> tuple[ApplyFn, Params]:
    """``(apply_fn, params)`` of run.py's model ``model``, params as ``tf.constant`` s of
    the torch ``state_dict``'s weights (dtype kept)."""
    import tensorflow as tf

    return bind(model, state, APPLY), tf.nest.map_structure(tf.constant, params_from_state(state))
