"""Plain-JAX ports of benchmarks/run.py's five models, with the torch models' weights.

Each port is a batched ``apply_fn(params, x)`` computing the same function as run.py's
torch model: ``mlp256`` / ``mlp1024`` (Linear/tanh stack), ``cnn`` (NCHW convolutions,
max-pool, torch's flatten order), ``transformer`` (``TransformerBlock``: pre-norm
LayerNorm, ``nn.MultiheadAttention`` with 4 heads and ``batch_first``, exact GELU MLP,
mean over tokens) and ``gnn`` (``DenseGNN``: two message-passing layers on its fixed
adjacency, mean over nodes). ``params`` mirrors the torch ``state_dict`` (nested on its
dots, torch layouts kept: ``Linear`` weights ``(out, in)``, conv weights ``OIHW``);
buffers (the GNN's ``adj``) are closed over, not differentiated.

Only ``jax``, ``jax.numpy`` and ``numpy`` are used, and they are imported inside the
functions, so this module imports under both cvcore's JAX and the neural-tangents venv's
jax 0.4.25 (benchmarks/nt_peer.py uses it; that venv has no torch and no cvcore)::

    apply_fn, params = port("transformer", {k: v.numpy() for k, v in m.state_dict().items()})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

#: Model names, as in benchmarks/run.py.
MODELS = ("mlp256", "mlp1024", "cnn", "transformer", "gnn")
#: State-dict entries that are buffers (used in the forward pass, not differentiated).
BUFFERS = ("adj",)
#: ``nn.LayerNorm``'s default epsilon.
LAYER_NORM_EPS = 1e-5
#: ``TransformerBlock``'s ``nn.MultiheadAttention`` head count.
HEADS = 4

Params = dict[str, Any]
ApplyFn = Callable[[Params, Any], Any]


def params_from_state(state: Mapping[str, np.ndarray]) -> Params:
    """The params pytree from a torch ``state_dict`` (as NumPy arrays), buffers left out.

    Keys are nested on their dots: ``"attn.out_proj.weight"`` becomes
    ``params["attn"]["out_proj"]["weight"]``; arrays keep their dtype and torch layout."""
    params: Params = {}
    for key, value in state.items():
        if key in BUFFERS:
            continue
        *path, leaf = key.split(".")
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = np.asarray(value)
    return params


def _linear(p: Params, x: Any) -> Any:
    """``nn.Linear`` on the last axis of ``x``, torch ``(out, in)`` weight: ``x Wᵀ + b``.

    One ``dot_general`` contracting the weight's ``in`` axis, with no ``transpose`` of
    the weight: neural-tangents' structured derivatives do not see through a transposed
    parameter and fall back to its full Jacobian."""
    import jax

    dims = (((x.ndim - 1,), (1,)), ((), ()))
    return jax.lax.dot_general(x, p["weight"], dims) + p["bias"]


def sequential(p: Params) -> list[Params]:
    """The layers of an ``nn.Sequential`` with parameters, in order of their index."""
    return [p[k] for k in sorted(p, key=int)]


def stacked(p: Params, x: Any, linear: Callable[[Params, Any], Any],
            activation: Callable[[Any], Any]) -> Any:
    """``nn.Sequential`` of linear layers with ``activation`` between them, in any
    framework (the TensorFlow ports use it with their own ``linear`` and ``tanh``)."""
    layers = sequential(p)
    h = x
    for k, layer in enumerate(layers):
        h = linear(layer, h)
        if k < len(layers) - 1:
            h = activation(h)
    return h


def mlp_apply(p: Params, x: Any) -> Any:
    """run.py's MLP: Linear layers with tanh between them; ``x`` is ``(N, 784)``."""
    import jax.numpy as jnp

    return stacked(p, x, _linear, jnp.tanh)


def cnn_apply(p: Params, x: Any) -> Any:
    """run.py's CNN: (Conv 3×3 pad 1 → ReLU → MaxPool 2) × 2 → Flatten → Linear.

    ``x`` is ``(N, 1, 28, 28)``, NCHW like torch, so flattening matches ``nn.Flatten``."""
    import jax

    *convs, head = sequential(p)
    h = x
    for conv in convs:
        h = jax.lax.conv_general_dilated(h, conv["weight"], window_strides=(1, 1),
                                         padding=((1, 1), (1, 1)),
                                         dimension_numbers=("NCHW", "OIHW", "NCHW"))
        h = jax.nn.relu(h + conv["bias"][None, :, None, None])
        h = jax.lax.reduce_window(h, -math.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    return _linear(head, h.reshape(h.shape[0], -1))


def _layer_norm(p: Params, x: Any) -> Any:
    """``nn.LayerNorm`` over the last axis (biased variance, ``LAYER_NORM_EPS``)."""
    import jax.numpy as jnp

    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + LAYER_NORM_EPS) * p["weight"] + p["bias"]


def _self_attention(p: Params, h: Any) -> Any:
    """``nn.MultiheadAttention(d, HEADS, batch_first=True)(h, h, h)[0]`` (no dropout).

    ``in_proj_weight`` stacks the query, key and value projections ``(3d, d)``; each head
    takes a contiguous ``d / HEADS`` slice of the features."""
    import jax

    n, tokens, d = h.shape
    qkv = _linear({"weight": p["in_proj_weight"], "bias": p["in_proj_bias"]}, h)
    q, k, v = (t.reshape(n, tokens, HEADS, d // HEADS).transpose(0, 2, 1, 3)
               for t in (qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]))
    weights = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // HEADS), axis=-1)
    heads = (weights @ v).transpose(0, 2, 1, 3).reshape(n, tokens, d)
    return _linear(p["out_proj"], heads)


def _gelu(x: Any) -> Any:
    """``nn.GELU()``: the exact form ``x Φ(x) = x (1 + erf(x / √2)) / 2``."""
    import jax

    return 0.5 * x * (1 + jax.lax.erf(x / math.sqrt(2)))


def transformer_apply(p: Params, x: Any) -> Any:
    """run.py's ``TransformerBlock``: pre-norm attention and 4× GELU MLP, each residual,
    then the head on the mean over tokens; ``x`` is ``(N, 16, 64)``."""
    x = x + _self_attention(p["attn"], _layer_norm(p["n1"], x))
    fc1, fc2 = sequential(p["mlp"])
    x = x + _linear(fc2, _gelu(_linear(fc1, _layer_norm(p["n2"], x))))
    return _linear(p["head"], x.mean(1))


def gnn_apply(p: Params, x: Any, adj: Any) -> Any:
    """run.py's ``DenseGNN``: ``relu(msg(A h) + self(h))`` twice, then the head on the
    mean over nodes; ``x`` is ``(N, nodes, features)``, ``adj`` the normalised adjacency."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(adj, x.dtype)
    h = jax.nn.relu(_linear(p["msg1"], a @ x) + _linear(p["self1"], x))
    h = jax.nn.relu(_linear(p["msg2"], a @ h) + _linear(p["self2"], h))
    return _linear(p["head"], h.mean(1))


def bind(model: str, state: Mapping[str, np.ndarray], applies: Mapping[str, Callable[..., Any]]
         ) -> ApplyFn:
    """``apply_fn(params, x)`` of run.py's model ``model`` from one framework's apply
    functions (keys ``mlp``, ``cnn``, ``transformer``, ``gnn``; the GNN's takes the
    adjacency as a third argument, bound here from the state's ``adj`` buffer)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    if model == "gnn":
        adj = np.asarray(state["adj"])
        return lambda p, x: applies["gnn"](p, x, adj)
    return applies["mlp" if model.startswith("mlp") else model]


#: The JAX apply functions, by model kind.
APPLY: dict[str, Callable[..., Any]] = {"mlp": mlp_apply, "cnn": cnn_apply,
                                        "transformer": transformer_apply, "gnn": gnn_apply}


def port(model: str, state: Mapping[str, np.ndarray]) -> tuple[ApplyFn, Params]:
    """``(apply_fn, params)`` of run.py's model ``model`` with the weights of its torch
    ``state_dict`` (NumPy arrays; the dtype is kept)."""
    return bind(model, state, APPLY), params_from_state(state)
